"""The container image, built and run for real (issue #16): the Dockerfile, the compose file and the image's
HEALTHCHECK and signal handling, under a real engine.

  1. the image builds from the Dockerfile as committed, changing only --build-arg BASE; weights and page inside;
  2. it runs the way docker-compose.yml runs it (flags taken from the compose file): non-root, read-only root,
     tmpfs /tmp, no capabilities, no-new-privileges;
  3. its HEALTHCHECK turns healthy and /readyz answers 200;
  4. it serves: the same PNG bytes for a seeded reconstruction, the same embedding numbers, as the server on the host;
  5. `docker stop -t 30` with requests in flight: every request answered, exit code 0;
  6. `docker-compose --profile cpu up -d mae-serve-cpu` (image prebuilt and tagged): ready on the published port,
     healthy, then `down`;
  7. a tampered MAE_WEIGHTS_SHA256: the container exits non-zero with its one-line message in `docker logs`.

Engines: podman builds (it runs the Dockerfile's `RUN --mount=...,from=builder` without BuildKit, which needs
buildx), `podman save | docker load` moves the image, Docker Engine runs it. The official bases cannot be pulled
here, so BASE is a stand-in (scripts/container_base.sh: Debian 12 + Python 3.11 + CPU torch), cached between runs.
Set up as root (what .ci/run does):

    apt-get install -y --no-install-recommends docker.io podman debootstrap docker-compose
    eval "$(scripts/container_engine.sh start)"          # a private dockerd; exports DOCKER_HOST
    .venv/bin/python -m pytest -m container
    scripts/container_engine.sh stop --purge

Where no engine can run, every test here skips and says what is missing; with MAE_CONTAINER_REQUIRED=1 (CI) that
is a failure instead. MAE_CONTAINER_BASE=<image> builds on another base (e.g. python:3.11-slim-bookworm where it can
be pulled). The measured figures (build time, image size, time to healthy, ...) go to test-artifacts/container.json.
Everything the tests create (images, containers, compose project) is removed at the end; the stand-in base stays.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ServerProcess, free_port
from tests.serving import image_bytes

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
BUNDLED_WEIGHTS = ROOT / "weights" / "mae_demo.safetensors"
PAGE = ROOT / "app" / "static" / "index.html"
FIGURES_FILE = ROOT / "test-artifacts" / "container.json"
RUN_ID = f"{os.getpid()}-{int(time.time())}"
LABEL = f"mae-serve.test={RUN_ID}"  # on every container the tests start, so the teardown finds them all
CPU_SERVICE = "mae-serve-cpu"
# Both servers of the comparison (container and host) run the same kernels on the same number of threads:
# MAE_CPU_KERNELS=auto picks by a start-up timing, which two processes need not agree on.
SAME_NUMERICS = {"MAE_DEVICE": "cpu", "MAE_CPU_KERNELS": "onednn", "MAE_TORCH_THREADS": "2"}
FIGURES: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run([DOCKER, *args], timeout=timeout, check=check)


DOCKER = os.environ.get("MAE_DOCKER") or shutil.which("docker") or "docker"


def missing_engine() -> str | None:
    """Why the container tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root: podman build and a private dockerd need root here"
    for tool, pkg in (("podman", "podman"), ("docker", "docker.io"), ("docker-compose", "docker-compose")):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {pkg})"
    try:
        r = subprocess.run([DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True,
                           timeout=20)  # fmt: skip
    except subprocess.TimeoutExpired:
        r = None
    if r is None or r.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        return f'no Docker Engine answers at {where}: eval "$(scripts/container_engine.sh start)" starts one'
    return None


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    reason = missing_engine()
    if reason:
        if os.environ.get("MAE_CONTAINER_REQUIRED") == "1":
            pytest.fail(f"MAE_CONTAINER_REQUIRED=1 but {reason}")
        pytest.skip(reason)
    FIGURES["engine"] = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    FIGURES["storage_driver"] = docker("info", "--format", "{{.Driver}}").stdout.strip()
    yield
    # Whatever a failed test left behind.
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    FIGURES_FILE.parent.mkdir(exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2) + "\n")


@pytest.fixture(scope="session")
def base_image(engine: None) -> str:
    if os.environ.get("MAE_CONTAINER_BASE"):
        FIGURES["base"] = {"image": os.environ["MAE_CONTAINER_BASE"], "stand_in": False}
        return os.environ["MAE_CONTAINER_BASE"]
    t0 = time.monotonic()
    r = run(["bash", str(ROOT / "scripts" / "container_base.sh")], timeout=1200)
    tag = r.stdout.strip().splitlines()[-1]
    FIGURES["base"] = {
        "image": tag,
        "stand_in": True,
        "cached": "cached:" in r.stderr,
        "seconds": round(time.monotonic() - t0, 1),
    }
    return tag


@dataclass
class Image:
    tag: str
    build_cmd: list[str]
    config: dict[str, Any]  # docker image inspect's Config


def compose_file() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="session")
def image(base_image: str) -> Iterator[Image]:
    """The image, built by podman from the Dockerfile as committed with only BASE changed, loaded into Docker."""
    tag = f"localhost/mae-serve:test-{RUN_ID}"
    # --layers=false: no intermediate images left in podman's store; --format docker: keeps the HEALTHCHECK
    # (the OCI image format has no field for it); --network host: the build's pip reaches PyPI as this machine does.
    cmd = ["podman", "build", "--layers=false", "--format", "docker", "--network", "host",
           "--build-arg", f"BASE={base_image}", "-t", tag, "-f", "Dockerfile", "."]  # fmt: skip
    t0 = time.monotonic()
    built = run(cmd, timeout=1200, check=False, cwd=ROOT)
    FIGURES["build_seconds"] = round(time.monotonic() - t0, 1)
    assert built.returncode == 0, f"podman build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    try:
        t0 = time.monotonic()
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", tag], stdout=subprocess.PIPE)
        load = subprocess.run([DOCKER, "load"], stdin=save.stdout, capture_output=True, text=True, timeout=900)
        save.stdout.close()  # type: ignore[union-attr]
        assert save.wait(timeout=60) == 0 and load.returncode == 0, f"podman save | docker load: {load.stderr}"
        FIGURES["load_seconds"] = round(time.monotonic() - t0, 1)
    finally:
        run(["podman", "rmi", "-f", tag], check=False)  # Docker has it now; the stand-in base stays cached
    info = json.loads(docker("image", "inspect", tag).stdout)[0]
    FIGURES["image_bytes"] = info["Size"]
    FIGURES["image_mb"] = round(info["Size"] / 1e6)
    try:
        yield Image(tag, cmd, info["Config"])
    finally:
        docker("rmi", "-f", tag, check=False)


# ----------------------------------------------------------------------------------------------------------------
# Running it as docker-compose.yml does
# ----------------------------------------------------------------------------------------------------------------


def compose_run_flags(service: dict, weights_dir: Path) -> list[str]:
    """`docker run` flags equal to what the compose service sets (hardening, lifecycle, its fixed environment)."""
    flags = ["--read-only"] if service.get("read_only") else []
    for mount in service.get("tmpfs", []):
        flags += ["--tmpfs", mount]
    for cap in service.get("cap_drop", []):
        flags += ["--cap-drop", cap]
    for opt in service.get("security_opt", []):
        flags += ["--security-opt", opt]
    if service.get("init"):
        flags.append("--init")
    if "stop_signal" in service:
        flags += ["--stop-signal", service["stop_signal"]]
    for name, value in (service.get("environment") or {}).items():
        if value is not None:  # listed without a value: passed through from the shell only when set there
            flags += ["-e", f"{name}={value}"]
    for volume in service.get("volumes", []):
        target = volume.rsplit(":", 2)[-2] if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)[-1]
        flags += ["-v", f"{weights_dir}:{target}:ro"]
    return flags


@dataclass
class Container:
    name: str
    url: str
    started: float  # time.monotonic() at `docker run`

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        r = docker("logs", self.name, check=False)
        return r.stdout + r.stderr


def start_container(image: Image, tmp: Path, name: str, env: dict[str, str] | None = None) -> Container:
    service = compose_file()["services"][CPU_SERVICE]
    port = free_port()
    flags = compose_run_flags(service, tmp)
    for k, v in (env or {}).items():
        flags += ["-e", f"{k}={v}"]
    started = time.monotonic()
    # Published on loopback only; the tests talk to the container through that port, never to its bridge address.
    docker("run", "-d", "--name", name, "--label", LABEL, "-p", f"127.0.0.1:{port}:8000", *flags, image.tag)
    return Container(name, f"http://127.0.0.1:{port}", started)


def wait_ready(url: str, timeout: float, container: str | None = None) -> float:
    """Seconds until GET /readyz is 200 (fails early if the container exits)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if container and docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true":
            raise AssertionError(f"{container} exited before it was ready:\n" + docker("logs", container).stderr)
        time.sleep(0.25)
    raise AssertionError(f"{url}/readyz not 200 after {timeout:.0f} s")


def wait_healthy(container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        if status == "healthy":
            return
        assert status in ("starting", ""), f"{container}: health {status}: {docker('inspect', container).stdout}"
        time.sleep(0.5)
    raise AssertionError(f"{container} not healthy after {timeout:.0f} s")


@pytest.fixture(scope="module")
def served(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The image running as the compose service runs it, plus the numerics pins of the host comparison."""
    c = start_container(image, tmp_path_factory.mktemp("weights"), f"mae-serve-test-{RUN_ID}", SAME_NUMERICS)
    try:
        wait_ready(c.url, 300, c.name)
        FIGURES["time_to_ready_s"] = round(time.monotonic() - c.started, 1)
        yield c
    finally:
        docker("rm", "-f", c.name, check=False)


def exec_python(container: str, code: str) -> Any:
    """Run Python in the container (as its user) and return what it printed, as JSON."""
    return json.loads(docker("exec", container, "python", "-c", code).stdout)


# ----------------------------------------------------------------------------------------------------------------
# 1. build
# ----------------------------------------------------------------------------------------------------------------


def test_image_builds_from_the_dockerfile_with_only_base_changed(image: Image, served: Container):
    build_args = [image.build_cmd[i + 1] for i, a in enumerate(image.build_cmd) if a == "--build-arg"]
    assert [a.split("=")[0] for a in build_args] == ["BASE"], build_args
    assert image.build_cmd[image.build_cmd.index("-f") + 1] == "Dockerfile"
    # The image's own settings, as the Dockerfile declares them.
    assert image.config["User"] == "10001:10001"
    assert image.config["Entrypoint"] == ["mae-serve"]
    probe = image.config["Healthcheck"]["Test"]
    assert probe[0] == "CMD" and "/readyz" in " ".join(probe), probe
    assert image.config["StopSignal"] == "SIGTERM"
    assert "8000/tcp" in image.config["ExposedPorts"]
    # The bundled weights and the page are package data inside the image, byte for byte the repository's.
    inside = exec_python(
        served.name,
        "import hashlib, importlib.resources as r, json; "
        "h = lambda p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None; "
        "print(json.dumps({'weights': h(r.files('weights') / 'mae_demo.safetensors'), "
        "'page': h(r.files('app') / 'static' / 'index.html')}))",
    )
    assert inside == {
        "weights": hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest(),
        "page": hashlib.sha256(PAGE.read_bytes()).hexdigest(),
    }
    page = httpx.get(served.url + "/", timeout=10)
    assert page.status_code == 200 and page.content == PAGE.read_bytes()
    models = httpx.get(served.url + "/v1/models", timeout=10).json()
    assert hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest() in json.dumps(models)


# ----------------------------------------------------------------------------------------------------------------
# 2. hardening as in docker-compose.yml
# ----------------------------------------------------------------------------------------------------------------

# What the server process itself sees: its ids, its capabilities, no_new_privs, and whether / and /tmp are writable.
PROCESS_FACTS = r"""
import json, os
def argv(p):
    return open(f'/proc/{p}/cmdline', 'rb').read().decode().split('\0')
# The server: python running the mae-serve script (PID 1 is the init that compose's `init: true` adds).
pid = next(p for p in os.listdir('/proc') if p.isdigit() and any(a.endswith('/mae-serve') for a in argv(p)))
status = dict(line.split(':', 1) for line in open(f'/proc/{pid}/status').read().splitlines() if ':' in line)
def writable(path):
    try:
        with open(path, 'w') as f:
            f.write('x')
        os.remove(path)
        return True
    except OSError as e:
        return e.strerror
mounts = {m.split()[1]: m.split()[2] for m in open('/proc/mounts')}
print(json.dumps({'argv': argv(pid), 'uid': status['Uid'].split(), 'gid': status['Gid'].split(),
                  'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
                  'no_new_privs': status['NoNewPrivs'].strip(), 'root': writable('/probe'),
                  'usr': writable('/usr/local/probe'), 'tmp': writable('/tmp/probe'), 'tmp_fs': mounts.get('/tmp')}))
"""


def test_runs_hardened_as_compose_runs_it(served: Container):
    service = compose_file()["services"][CPU_SERVICE]
    host = served.inspect()["HostConfig"]
    assert host["ReadonlyRootfs"] is (service["read_only"] is True) is True
    assert host["CapDrop"] == service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert "/tmp" in host["Tmpfs"] and host["Init"] is True
    facts = exec_python(served.name, PROCESS_FACTS)
    assert facts["uid"] == ["10001"] * 4 and facts["gid"] == ["10001"] * 4, facts
    assert int(facts["cap_eff"], 16) == 0 and int(facts["cap_bnd"], 16) == 0, facts
    assert facts["no_new_privs"] == "1", facts
    assert facts["root"] == facts["usr"] == "Read-only file system", facts
    assert facts["tmp"] is True and facts["tmp_fs"] == "tmpfs", facts


# ----------------------------------------------------------------------------------------------------------------
# 3. health
# ----------------------------------------------------------------------------------------------------------------


def docker_time(stamp: str) -> datetime:
    """Docker's RFC 3339 timestamps carry nanoseconds; Python reads microseconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


def test_healthcheck_turns_healthy_and_readyz_is_200(served: Container):
    wait_healthy(served.name, 240)
    state = served.inspect()["State"]
    health = state["Health"]
    assert health["Log"] and health["Log"][-1]["ExitCode"] == 0, health
    # From the container's start to the end of its first passing probe, by Docker's own clock.
    first_pass = next(p for p in health["Log"] if p["ExitCode"] == 0)
    healthy = (docker_time(first_pass["End"]) - docker_time(state["StartedAt"])).total_seconds()
    FIGURES["time_to_healthy_s"] = round(healthy, 1)
    FIGURES["healthcheck_probes_until_healthy"] = health["Log"].index(first_pass) + 1
    assert httpx.get(served.url + "/readyz", timeout=5).status_code == 200
    assert httpx.get(served.url + "/healthz", timeout=5).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# 4. same answers as on the host
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same server on the host: this checkout's code in this Python, the same settings as the container."""
    log = tmp_path_factory.mktemp("host") / "server.log"
    with ServerProcess(SAME_NUMERICS, log_path=log) as server:
        yield server.url


def test_serves_the_same_bytes_and_numbers_as_the_host(served: Container, host_server: str):
    images = [image_bytes(224, 224, seed=s) for s in range(3)] + [image_bytes(300, 200, seed=9, fmt="JPEG")]
    with httpx.Client(timeout=60) as client:
        for i, data in enumerate(images):
            answers = {}
            for where, url in (("container", served.url), ("host", host_server)):
                r = client.post(url + "/v1/reconstruct", params={"seed": 7 + i}, content=data,
                                headers={"Content-Type": "image/png"})  # fmt: skip
                e = client.post(url + "/v1/embed", params={"pool": "all"}, content=data,
                                headers={"Content-Type": "image/png"})  # fmt: skip
                assert r.status_code == 200 and r.headers["content-type"] == "image/png", (where, r.text[:300])
                assert e.status_code == 200, (where, e.text[:300])
                answers[where] = (r.content, e.json())
            (png_c, emb_c), (png_h, emb_h) = answers["container"], answers["host"]
            assert png_c == png_h, f"image {i}: the PNGs differ ({len(png_c)} B in the container, {len(png_h)} B here)"
            assert emb_c["cls"] and emb_c == emb_h, f"image {i}: the container's embedding differs from the host's"


# ----------------------------------------------------------------------------------------------------------------
# 7. a tampered pin (before 5, which stops the shared container)
# ----------------------------------------------------------------------------------------------------------------


def test_tampered_weights_pin_exits_nonzero_with_one_line(image: Image, tmp_path: Path):
    real = hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest()
    tampered = real[:-1] + ("0" if real[-1] != "0" else "1")
    c = start_container(image, tmp_path, f"mae-serve-test-pin-{RUN_ID}", {"MAE_WEIGHTS_SHA256": tampered})
    try:
        rc = int(docker("wait", c.name, timeout=180).stdout.strip())
        logs = c.logs()
        assert rc != 0, f"a tampered pin must stop the start, got exit {rc}:\n{logs}"
        ours = [line for line in logs.splitlines() if line.startswith("mae-serve: ")]
        assert len(ours) == 1, f"one line from mae-serve expected:\n{logs}"
        assert f"has sha256 {real}, but MAE_WEIGHTS_SHA256 expects {tampered}" in ours[0], ours
        assert "Traceback" not in logs, logs
    finally:
        docker("rm", "-f", c.name, check=False)


# ----------------------------------------------------------------------------------------------------------------
# 6. compose
# ----------------------------------------------------------------------------------------------------------------


def test_compose_profile_cpu_up_ready_down(image: Image, tmp_path: Path):
    service = compose_file()["services"][CPU_SERVICE]
    name = service["image"]  # mae-serve:0.1.0-cpu: the compose file's own tag, pointed at the image built here
    before = docker("image", "inspect", "-f", "{{.Id}}", name, check=False)
    previous = before.stdout.strip() if before.returncode == 0 else None
    docker("tag", image.tag, name)
    port = free_port()
    project = f"maetest{RUN_ID.replace('-', '')}"
    env = {**os.environ, "MAE_PUBLISH": str(port), "MAE_WEIGHTS_DIR": str(tmp_path)}
    env = {k: v for k, v in env.items() if not k.startswith("MAE_") or k in ("MAE_PUBLISH", "MAE_WEIGHTS_DIR")}
    compose = ["docker-compose", "-f", str(COMPOSE), "-p", project, "--profile", "cpu"]
    try:
        t0 = time.monotonic()
        run([*compose, "up", "-d", "--no-build", CPU_SERVICE], env=env, cwd=ROOT, timeout=300)
        (cid,) = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout.split()
        wait_ready(f"http://127.0.0.1:{port}", 300, cid)
        FIGURES["compose_ready_s"] = round(time.monotonic() - t0, 1)
        host = json.loads(docker("inspect", cid).stdout)[0]["HostConfig"]
        assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["Init"] is True
        assert host["PortBindings"]["8000/tcp"][0]["HostPort"] == str(port)
        wait_healthy(cid, 240)  # the compose file's own healthcheck, under the read-only root
        FIGURES["compose_healthy_s"] = round(time.monotonic() - t0, 1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/reconstruct", params={"seed": 1}, content=image_bytes(),
                       headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        down = run([*compose, "down", "-t", "30"], env=env, cwd=ROOT, timeout=120)
        assert not docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout.split()
        assert project not in docker("network", "ls", "--format", "{{.Name}}").stdout, down.stderr
    finally:
        run([*compose, "down", "-t", "5"], env=env, cwd=ROOT, timeout=120, check=False)
        if previous:
            docker("tag", previous, name, check=False)
        else:
            docker("rmi", name, check=False)  # the tag only: the image itself goes with image.tag


# ----------------------------------------------------------------------------------------------------------------
# scripts/gpu/kit.py --container: a GPU host's one command for the image, run here on the CPU image
# ----------------------------------------------------------------------------------------------------------------


def test_gpu_kit_container_mode_on_the_cpu_image(image: Image, tmp_path):
    """What a GPU host with Docker runs (`kit.py --container mae-serve:0.1.0`), here without the GPU: the image's
    servers against a float32 CPU reference of the same image (smoke), under load, then `docker stop` mid-load."""
    out = tmp_path / "kit"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu" / "kit.py"), "--container", image.tag, "--docker", DOCKER]
    cmd += ["--device", "cpu", "--quick", "--install", "never", "--out", str(out)]
    t0 = time.monotonic()
    r = run(cmd, timeout=600, check=False, cwd=ROOT)
    FIGURES["gpu_kit_container_cpu_s"] = round(time.monotonic() - t0, 1)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [p["status"] for p in res["phases"].values()] == ["ok", "ok", "ok"]  # env, smoke, http
    assert "--gpus" not in r.stdout and res["phases"]["http"]["drain"]["in_flight_at_sigterm"] > 0
    assert not docker("ps", "-aq", "--filter", "name=mae-kit-").stdout.split(), "the kit left a container"


# ----------------------------------------------------------------------------------------------------------------
# 5. docker stop with requests in flight (last: it stops the shared container)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    ended: float
    result: str  # "200", "503", or the transport error


async def request_stream(url: str, body: bytes, workers: int, stop_sending: threading.Event) -> list[Outcome]:
    """`workers` clients, each sending one request after the other until stop_sending is set."""
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while not stop_sending.is_set():
                t0 = time.monotonic()
                try:
                    r = await client.post("/v1/reconstruct", params={"format": "json"}, content=body,
                                          headers={"Content-Type": "application/json"})  # fmt: skip
                    result = str(r.status_code)
                except httpx.TransportError as e:
                    result = type(e).__name__
                outcomes.append(Outcome(t0, time.monotonic(), result))
                if result not in ("200", "503"):
                    return  # the server has closed its listener

        await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


def test_docker_stop_answers_in_flight_requests_and_exits_0(served: Container):
    # A few images a request, so that each takes long enough to be caught in flight.
    body = json.dumps({"images": [base64.b64encode(image_bytes(224, 224, seed=s)).decode() for s in range(4)],
                       "seed": 3}).encode()  # fmt: skip
    stop_sending = threading.Event()
    box: dict[str, Any] = {}
    sender = threading.Thread(target=lambda: box.update(out=asyncio.run(request_stream(served.url, body, 6,
                                                                                        stop_sending))))  # fmt: skip
    sender.start()
    time.sleep(2.0)  # the stream is flowing
    t_stop = time.monotonic()
    stop = docker("stop", "-t", "30", served.name, timeout=60)
    FIGURES["stop_seconds"] = round(time.monotonic() - t_stop, 2)
    stop_sending.set()
    sender.join(timeout=90)
    assert not sender.is_alive(), "the requests did not finish"
    outcomes: list[Outcome] = box["out"]
    # Sent 0.2 s or more before `docker stop`: the server had read them, so each must be answered.
    admitted = [o for o in outcomes if o.started < t_stop - 0.2]
    in_flight = [o for o in admitted if o.ended > t_stop]
    unanswered = [o.result for o in admitted if o.result not in ("200", "503")]
    state = served.inspect()["State"]
    print(f"\ndocker stop: {stop.stdout.strip()} in {FIGURES['stop_seconds']} s, {len(admitted)} requests before it,"
          f" {len(in_flight)} in flight, exit {state['ExitCode']}")  # fmt: skip
    FIGURES["stop_in_flight"] = len(in_flight)
    assert len(admitted) >= 6 and in_flight, "no request was in flight at `docker stop`: the test proved nothing"
    assert not unanswered, f"requests sent before `docker stop` were dropped: {unanswered}"
    assert all(o.result == "200" for o in in_flight), [o.result for o in in_flight]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert FIGURES["stop_seconds"] < 30, "docker stop waited for its SIGKILL: the drain did not end the process"
    assert "Traceback" not in served.logs()
