"""deploy/kuberay/rayjob.yaml, offline: a RayJob is a CRD, so it is checked against KubeRay's own schema (the v1
RayJob openAPIV3Schema of KubeRay v1.7.0-rc.0, ray-operator/config/crd/bases/ray.io_rayjobs.yaml, with the pod
templates cut out: tests/data/kuberay-rayjob-v1.schema.json), strictly (an unknown field fails: the API server
would drop it without a word); each pod template is validated as a Pod by kubernetes-validate; the entrypoint is
parsed by mae-embed-ray's own parser; credentials come from a Secret, never from the entrypoint.
"""

from __future__ import annotations

import json
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
SCHEMA = ROOT / "tests" / "data" / "kuberay-rayjob-v1.schema.json"
K8S_MIN_VERSION = "1.29.0"


@cache
def rayjob() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    (doc,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    return dict(doc)


def strict(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false wherever it lists properties."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def entrypoint() -> Any:
    from app.raydata.cli import parser

    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[0] == "mae-embed-ray"
    return parser().parse_args(argv[1:])


def test_rayjob_fields_are_kuberay_fields():
    jsonschema = pytest.importorskip("jsonschema")
    doc = rayjob()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    schema = strict(json.loads(SCHEMA.read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: Kubernetes' own, checked by the API server
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_rayjob_pod_templates_validate_as_pods():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    for name, template in pod_templates():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"mae-embed-{name}"}, "spec": template["spec"]}
        for version in (K8S_MIN_VERSION, latest_version()):
            try:
                kv.validate(pod, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{name}: not a valid Pod for Kubernetes {version}: {e}")


def test_entrypoint_is_a_valid_command_and_fits_the_workers():
    a = entrypoint()
    assert a.src.startswith("s3://") and a.out.startswith("s3://")
    spec = rayjob()["spec"]["rayClusterSpec"]
    (workers,) = spec["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    cpus_per_pod = float(container["resources"]["requests"]["cpu"])
    # every actor gets its GPU, and every worker has CPUs beyond its actors' for decoding
    assert a.num_gpus == 1 and a.concurrency * a.num_gpus == workers["replicas"] * gpus_per_pod
    actors_per_pod = gpus_per_pod / a.num_gpus
    assert cpus_per_pod - actors_per_pod * a.cpus_per_actor >= 4
    assert workers["minReplicas"] == workers["replicas"] == workers["maxReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs the driver, no tasks
    assert spec["rayVersion"].startswith("2.")
    weights = a.weights.split("=")[-1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(weights.startswith(m + "/") for m in mounts), "the weights' path is mounted in the workers"


def test_credentials_only_from_a_secret():
    text = RAYJOB.read_text()
    entry = rayjob()["spec"]["entrypoint"]
    for word in ("AWS_", "TOKEN", "SECRET", "KEY=", "storage-options", "@"):
        assert word not in entry, f"{word} in the entrypoint: Ray records it in its job table"
    for name, template in pod_templates():
        for c in template["spec"]["containers"]:
            literal = {e["name"] for e in c.get("env", []) if "value" in e}
            assert not {n for n in literal if "KEY" in n or "TOKEN" in n or "SECRET" in n}, (name, literal)
            assert {"secretRef": {"name": "mae-embed-storage"}} in c["envFrom"], name
    assert "AWS_SECRET_ACCESS_KEY=..." in text  # the instructions make the Secret, with placeholders only
