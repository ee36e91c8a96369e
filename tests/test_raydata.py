"""`mae-embed-ray` on real parts: a Ray cluster of two nodes (a head and a worker, separate processes on this
machine), an S3 API (moto's server on loopback) holding WebDataset tars, a parquet of image bytes and loose files,
and a real mae-serve to compare with. The job spreads over both nodes (node ids per shard in the manifest); its
embeddings equal /v1/embed's for the same images, pool and dtype; corrupt and unsupported images are rows with
their error, none lost; a rerun skips every finished shard; a worker node killed mid-job leaves a job that
finishes, or resumes, to the same output.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from client.mae_client import MAEClient
from tests.harness import free_port
from tests.serving import image_bytes, live_server

pytestmark = pytest.mark.cluster

ray = pytest.importorskip("ray", reason="pip install 'mae-serve[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
boto3 = pytest.importorskip("boto3")

from app.raydata.job import Options, run  # noqa: E402  (after the skips: needs ray)
from client.dataset import table  # noqa: E402

BUCKET = "data"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # fmt: skip


def slow_forward(entry: Any, op: Any, images: Any, masking: Any) -> Any:
    """The real model call, a little slower: the kill test needs a job that takes seconds."""
    from app.serving import model_thread

    time.sleep(0.25)
    return model_thread.forward(entry, op, images, masking)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()


def make_objects() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    """({key: object bytes} to upload, {uri: image bytes} of the good images, {uri: error code} of the bad ones)."""
    objects: dict[str, bytes] = {}
    good: dict[str, bytes] = {}
    bad: dict[str, str] = {}
    fmts = ["PNG", "JPEG", "WEBP"]
    for s in range(3):
        members = []
        for i in range(8):
            data = image_bytes(24 + i, 20 + s, fmt=fmts[i % 3], seed=100 * s + i, mode="L" if i == 5 else "RGB")
            ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmts[i % 3]]
            members += [(f"{s:02d}{i:04d}.{ext}", data), (f"{s:02d}{i:04d}.cls", str(i).encode())]
            good[f"s3://{BUCKET}/tars/shard-{s:06d}.tar#{s:02d}{i:04d}.{ext}"] = data
        if s == 1:
            png = image_bytes(30, 30)
            for name, data, code in [("zz0001.png", png[: len(png) // 2], "undecodable"),
                                     ("zz0002.gif", _gif(), "unsupported_type"),
                                     ("zz0003.jpg", b"not an image at all", "unsupported_type")]:  # fmt: skip
                members.append((name, data))
                bad[f"s3://{BUCKET}/tars/shard-{s:06d}.tar#{name}"] = code
        objects[f"tars/shard-{s:06d}.tar"] = _tar(members)
    column: list[bytes | None] = []
    for r in range(7):
        data = image_bytes(40, 28 + r, fmt="JPEG", seed=1000 + r)
        column.append(data)
        good[f"s3://{BUCKET}/pq/images.parquet#{r}"] = data
    column += [None, b"\xff\xd8\xff" + bytes(200)]
    bad[f"s3://{BUCKET}/pq/images.parquet#7"] = "unreadable"
    bad[f"s3://{BUCKET}/pq/images.parquet#8"] = "undecodable"
    buf = io.BytesIO()
    t = pa.table({"key": [f"k{r}" for r in range(len(column))], "image": pa.array(column, pa.binary())})
    pq.write_table(t, buf, row_group_size=4)
    objects["pq/images.parquet"] = buf.getvalue()
    for i in range(5):
        data = image_bytes(33, 31, fmt="PNG", seed=2000 + i)
        objects[f"loose/img{i}.png"] = data
        good[f"s3://{BUCKET}/loose/img{i}.png"] = data
    return objects, good, bad


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, dict[str, bytes], dict[str, str]]]:
    """moto's S3 server on 127.0.0.1; credentials and endpoint in the environment only (set before the cluster
    starts, so its worker processes read them the same way)."""
    port = free_port()
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket=BUCKET)
        objects, good, bad = make_objects()
        for key, data in objects.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield f"http://127.0.0.1:{port}", good, bad
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3) -> Iterator[Any]:
    """A head and a worker node, each its own raylet and object store (separate processes)."""
    from ray.cluster_utils import Cluster

    store = 150 * 1024 * 1024
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "object_store_memory": store,
                                                      "include_dashboard": False})  # fmt: skip
    c.add_node(num_cpus=2, object_store_memory=store)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def reference(make_settings) -> Iterator[str]:
    with live_server(make_settings(warmup=False, log_level="warning")) as (url, _):
        yield url


def node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def rows_of(out: str) -> dict[str, dict[str, Any]]:
    """uri -> the row (index columns and arrays as numpy) of every file of an output."""
    rows: dict[str, dict[str, Any]] = {}
    for name in table.finished(out):
        t = pq.read_table(f"{out}/{name}.parquet")
        for r in t.to_pylist():
            rows[r["uri"]] = {k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v) for k, v in r.items()}
    return rows


def test_two_nodes_s3_equal_to_v1_embed_errors_recorded_and_resumed(cluster, s3, reference, weights, tmp_path):
    _, good, bad = s3
    out = str(tmp_path / "out")
    src = f"s3://{BUCKET}/{{tars/shard-{{000000..000002}}.tar,pq/*.parquet,loose}}"
    opts = Options(src=src, out=out, weights=str(weights), pool="all", shard_size=2, concurrency=2, batch_size=3,
                   progress=False)  # fmt: skip
    s = run(opts)
    assert (s.status, s.shards, s.written) == ("complete", 3 + 1 + 3, 7), s  # 5 loose files in shards of 2
    assert (s.images, s.embedded, s.errors) == (len(good) + len(bad), len(good), len(bad)), s

    # Spread: the job ran on both nodes, as the manifest says shard by shard (the decode tasks are spread; which
    # model actor takes a batch is the scheduler's choice, on a job this small often one)
    manifest = table.read_manifest(out)
    assert manifest is not None and manifest["status"] == "complete"
    assert "testing" not in str(manifest) and "127.0.0.1" not in str(manifest)  # no credentials, no endpoint
    shards = manifest["shards"].values()
    nodes = {n for sh in shards for n in (*sh["nodes"], *sh["decode_nodes"])}
    assert nodes == node_ids() and len(nodes) == 2, manifest["shards"]

    # Every image of the source is a row: the good ones ok, the bad ones with their error
    rows = rows_of(out)
    assert set(rows) == set(good) | set(bad)
    for uri, code in bad.items():
        assert rows[uri]["status"] == "error" and rows[uri]["error"].startswith(code), rows[uri]
        assert rows[uri]["cls"] is None and rows[uri]["patches"] is None
    # Equal to /v1/embed, one image at a time, same pool and dtype
    with MAEClient(reference) as c:
        for uri, data in good.items():
            ref = c.embed(data, pool="all")
            row = rows[uri]
            assert row["status"] == "ok" and row["error"] is None
            for key in ("cls", "mean", "patches", "patch_indices"):
                np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=f"{uri} {key}")
    # load_embeddings reads the parquet output: source order, rows of ok images only
    from client.dataset.store import load_embeddings

    cls, index = load_embeddings(out)
    assert cls.shape == (len(good), 32) and cls.dtype == np.float32
    assert set(index["path"]) == set(good)
    for i in (0, len(good) // 2, len(good) - 1):
        np.testing.assert_array_equal(cls[i], rows[index["path"][i]]["cls"].astype(np.float32))

    # A rerun finds every shard done in the output and computes nothing
    before = {p.name: p.read_bytes() for p in Path(out).glob("*.parquet")}
    s = run(opts)
    assert (s.status, s.skipped, s.written, s.images) == ("complete", 7, 0, 0), s
    assert {p.name: p.read_bytes() for p in Path(out).glob("*.parquet")} == before


def test_parquet_float16_masked_equal_to_v1_embed(cluster, s3, reference, weights, tmp_path):
    _, good, _ = s3
    out = str(tmp_path / "out")
    params = {"pool": "patches", "dtype": "float16", "mask_ratio": 0.5, "seed": 7}
    s = run(Options(src=f"s3://{BUCKET}/pq/images.parquet", out=out, weights=str(weights), concurrency=1,
                    batch_size=4, progress=False, **params))  # fmt: skip
    assert (s.status, s.embedded, s.errors) == ("complete", 7, 2), s
    patches, index = table.load(out)
    indices, _ = table.load(out, "patch_indices")
    assert patches.dtype == np.float16 and patches.shape == (7, 8, 32)  # half of the 16 patches
    with MAEClient(reference) as c:
        for i, uri in enumerate(index["path"]):
            ref = c.embed(good[uri], **params)
            np.testing.assert_allclose(patches[i].astype(np.float32), ref["patches"].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)  # fmt: skip
            np.testing.assert_array_equal(indices[i], ref["patch_indices"])  # the same seeded mask


def test_embed_dataset_reads_s3_too_and_load_embeddings_reads_both_outputs(cluster, s3, reference, weights, tmp_path):
    """The HTTP path through fsspec: the same tars from S3 by brace range; the two outputs, read by the one
    load_embeddings, agree image by image."""
    from client.dataset import embed_dataset
    from client.dataset.store import load_embeddings

    src = f"s3://{BUCKET}/tars/shard-{{000000..000002}}.tar"
    s = embed_dataset(src, tmp_path / "http", url=reference, pool="mean", progress=False)
    assert (s.status, s.embedded, s.errors) == ("complete", 24, 3), s
    assert run(Options(src=src, out=str(tmp_path / "ray"), weights=str(weights), pool="mean", progress=False,
                       concurrency=1)).status == "complete"  # fmt: skip
    a, ia = load_embeddings(tmp_path / "http")
    b, ib = load_embeddings(tmp_path / "ray")
    assert list(ia["path"]) == list(ib["path"]) and list(ia["sha256"]) == list(ib["sha256"])  # same URIs, order
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_worker_node_killed_midway_the_job_finishes_or_resumes_to_the_same_output(cluster, s3, weights, tmp_path):
    """Runs last: it takes the worker node down (and brings a fresh one up for whatever follows)."""
    src = f"s3://{BUCKET}/{{tars/*.tar,pq/images.parquet}}"
    common = {"weights": str(weights), "pool": "cls", "concurrency": 2, "batch_size": 2, "progress": False}
    ref = str(tmp_path / "ref")
    assert run(Options(src=src, out=ref, **common)).status == "complete"

    out = str(tmp_path / "out")
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["summary"] = run(Options(src=src, out=out, forward="tests.test_raydata:slow_forward", **common))
        except Exception as e:  # the job may fail with its node: then it is resumed below
            result["error"] = e

    worker = next(n for n in cluster.worker_nodes)
    t = threading.Thread(target=job)
    t.start()
    while not table.finished(out):  # the first shard is written: the job is under way on both nodes
        assert t.is_alive(), result
        time.sleep(0.05)
    done_at_kill = len(table.finished(out))
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: raylet, object store, workers
    t.join(timeout=280)
    assert not t.is_alive(), "the job hung after losing a node"
    assert done_at_kill < 4, "the job had finished before the node was killed: nothing was proven"
    if "error" in result:  # resume: only the shards not written
        s = run(Options(src=src, out=out, **common))
        assert s.status == "complete" and s.skipped >= done_at_kill, s
    else:
        assert result["summary"].status == "complete", result
    cluster.add_node(num_cpus=2, object_store_memory=150 * 1024 * 1024)

    got, want = rows_of(out), rows_of(ref)
    assert set(got) == set(want)
    for uri, row in want.items():
        assert (got[uri]["sha256"], got[uri]["status"], got[uri]["error"]) == (row["sha256"], row["status"],
                                                                              row["error"])  # fmt: skip
        if row["status"] == "ok":
            np.testing.assert_allclose(got[uri]["cls"], row["cls"], rtol=1e-5, atol=1e-6)
    assert sorted(table.finished(out)) == sorted(table.finished(ref))
