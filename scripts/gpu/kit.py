#!/usr/bin/env python3
"""The GPU kit: one offline run on a lent GPU machine that proves and measures everything GPU-related.

On the device (its python3 has torch and torchvision, no web stack, no network), with the wheels of
`make wheelhouse` carried along:

    run(carry=[".wheelhouse"], command="python3 scripts/gpu/kit.py", timeout_s=480)

Here, as a dry run on the CPU (tests/test_gpu_kit.py does this in `make test`):

    .venv/bin/python scripts/gpu/kit.py --device cpu --quick --out /tmp/kit
    .venv/bin/python scripts/gpu/kit.py --report /tmp/kit/results.json     # the BENCHMARKS.md table

Steps, each phase under its own time limit, `results.json` rewritten after every phase (a run cut short still
returns what it measured) and the server logs kept beside it in $OUT (or --out):

  env       install the wheels (pip --no-index --no-deps --target), nvidia-smi, torch.cuda, versions
  smoke     the bundled model on the GPU in fp32 and bf16 against fp32 on the CPU, as served (/v1/models must name
            the device and dtype; exact JSON keys; embedding cosine, reconstruction PSNR, the `mse` field) and
            in-process (TF32 on/off; bf16 with the normalisation in fp32 or cast like the weights)
  ceiling   a random ViT-B built on the device, fp32 and bf16, batch 1..256, through the engine's forward
            (pinned copy in, device->host copy of the answer out, torch.cuda.synchronize); the OOM batch split
  http      the same ViT-B served with MAE_WORKERS in {1, 8, 14}, several load-generator processes sending
            photo-sized JPEGs: images/s, p50/p99, mean batch (/metrics), server CPU-ms per image, GPU utilisation;
            then SIGTERM with requests in flight (the drain)
  jpeg      MAE_JPEG_DECODE=cuda (torchvision's nvJPEG decode): pixels against the CPU path, then served
  compile   MAE_COMPILE=default, then reduce-overhead (CUDA graphs), each served and measured

Exit status: 0 every check passed, 1 a check failed or a phase broke, 2 the kit could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUNDLED = REPO / "weights" / "mae_demo.safetensors"
SAMPLES = REPO / "app" / "static" / "samples"
# Imported by mae-serve or the kit, and not on the device image (KINDS.md of the device tool) or too old there.
NEEDED = (
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "uvicorn",
    "multipart",
    "orjson",
    "httptools",
    "zmq",
    "httpx",
    "einops",
    "safetensors",
    "prometheus_client",
    "PIL",
    "uvloop",
)
RECONSTRUCT_KEYS = {"model", "seed", "mask_ratio", "patch_size", "grid", "mask", "images", "mse", "psnr"}
EMBED_KEYS = {"model", "dim", "grid", "seed", "mask_ratio", "cls", "mean", "patches", "patch_indices"}
VIEWS = {"paste", "reconstruction", "masked", "original", "grid", "error"}
DEVICE_SIZES = [(4032, 3024), (3024, 4032), (2592, 1944), (3000, 2000), (2048, 1536), (1920, 1080), (1600, 1200)]
QUICK_SIZES = [(640, 480), (480, 640), (800, 600)]


class SetupError(RuntimeError):
    """The kit cannot go on (exit status 2)."""


class PhaseTimeout(BaseException):
    """A phase ran past its budget (BaseException: no `except Exception` on the way swallows it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise PhaseTimeout()


# ----------------------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------------------


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 1.0 if na == nb == 0.0 else float(a @ b / (na * nb)) if na and nb else 0.0


def psnr_u8(a: Any, b: Any) -> float:
    """PSNR in dB between two uint8 images (or arrays of pixels); inf when equal."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "min": min(values) if values else None,
        "median": statistics.median(values) if values else None,
        "max": max(values) if values else None,
        "finite_min": min(finite) if finite else None,
    }


def rounded(x: Any, digits: int = 6) -> Any:
    """JSON-safe: floats rounded, inf/nan as strings."""
    if isinstance(x, float):
        return round(x, digits) if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, digits) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------
# env: the wheels, the GPU
# ----------------------------------------------------------------------------------------------------------------


def missing_modules() -> list[str]:
    importlib.invalidate_caches()
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def bootstrap(args: argparse.Namespace) -> dict[str, Any]:
    """Install the wheelhouse into a folder of its own and put it first on the path of this process and of every
    process it starts. Only stdlib before this point: the device has none of the web stack."""
    info: dict[str, Any] = {"missing_before": missing_modules(), "wheelhouse": str(args.wheelhouse)}
    wheels = sorted(Path(args.wheelhouse).glob("*.whl"))
    info["wheels"] = len(wheels)
    install = args.install == "always" or (args.install == "auto" and info["missing_before"])
    if install:
        if not wheels:
            raise SetupError(
                f"missing {info['missing_before']} and no wheels in {args.wheelhouse}: run `make wheelhouse` here and "
                "carry .wheelhouse"
            )
        site = Path(args.site)
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        info["install_s"] = round(time.monotonic() - t0, 2)
        if r.returncode != 0:
            raise SetupError(f"pip install of the wheelhouse failed ({r.returncode}): {r.stderr[-2000:]}")
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        info["site"] = str(site)
    sys.path.insert(0, str(REPO))
    info["missing_after"] = missing_modules()
    if info["missing_after"]:
        raise SetupError(f"still missing after the install: {info['missing_after']}")
    return info


def nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"found": False}
    q = "name,driver_version,memory.total,clocks.max.sm,power.limit,compute_cap"
    r = subprocess.run([exe, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    out: dict[str, Any] = {"found": True, "rc": r.returncode, "raw": r.stdout.strip() or r.stderr.strip()}
    if r.returncode == 0 and r.stdout.strip():
        out.update(zip(q.split(","), (v.strip() for v in r.stdout.splitlines()[0].split(",")), strict=False))
    return out


def torch_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001 - recorded, the JPEG phase says what follows
        info["torchvision"] = f"not importable: {type(e).__name__}: {e}"
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
        )
        x = torch.randn(1024, 1024, device="cuda")
        info["matmul_ok"] = bool(torch.isfinite((x @ x).sum()).item())
    return info


class GpuSampler:
    """nvidia-smi every 200 ms in the background: utilisation and memory, read back for a window."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        exe = shutil.which("nvidia-smi")
        self.proc = None
        if exe:
            cmd = [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                util, mem = (float(v) for v in line.split(",")[:2])
                self.samples.append((time.time(), util, mem))

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"gpu_util_pct": None, "gpu_mem_mib_max": None}
        return {
            "gpu_util_pct": round(statistics.mean(s[1] for s in inside), 1),
            "gpu_mem_mib_max": max(s[2] for s in inside),
            "gpu_samples": len(inside),
        }

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


# ----------------------------------------------------------------------------------------------------------------
# --container: the servers as containers of an image (a GPU host with Docker, not the lent machine)
# ----------------------------------------------------------------------------------------------------------------

# The hardening docker-compose.yml gives the service (tests/test_deploy.py checks that the two agree).
CONTAINER_HARDENING = [
    "--read-only",
    "--tmpfs",
    "/tmp:size=1g,mode=1777",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--init",
]


def container_server(env: dict[str, str], image: str, docker: str, log_path: Path, label: str) -> Any:
    """A server as tests.harness.ServerProcess has it, run as `docker run IMAGE` the way docker-compose.yml runs it,
    published on a loopback port; a cuda device gets `--gpus all`, MAE_WEIGHTS (a file here) is mounted read-only
    at /weights. SIGTERM is `docker stop`, which waits for the drain."""
    import shlex

    from tests.harness import ServerProcess

    class ContainerServer(ServerProcess):
        def __init__(self) -> None:
            super().__init__(env, log_path=log_path)
            self.docker = shlex.split(docker)
            self.name = f"mae-kit-{label}-{os.getpid()}"
            self.stop_timeout = int(float(self.env.get("MAE_SHUTDOWN_TIMEOUT_S", "20"))) + 10
            self.started = False
            self.stopper: subprocess.Popen[bytes] | None = None

        def docker_run(self) -> list[str]:
            cmd = [*self.docker, "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000"]
            cmd += [*CONTAINER_HARDENING, "--stop-timeout", str(self.stop_timeout)]
            inner = {k: v for k, v in self.env.items() if k not in ("MAE_HOST", "MAE_PORT")}  # the image's own
            if inner.get("MAE_DEVICE", "").startswith("cuda"):
                cmd += ["--gpus", "all"]
            if inner.get("MAE_WEIGHTS"):
                host = Path(inner["MAE_WEIGHTS"]).resolve()
                cmd += ["-v", f"{host.parent}:/weights:ro"]
                inner["MAE_WEIGHTS"] = f"/weights/{host.name}"
            for k, v in inner.items():
                cmd += ["-e", f"{k}={v}"]
            return [*cmd, image]

        def run_docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*self.docker, *args], capture_output=True, text=True, timeout=timeout)

        def start(self) -> ContainerServer:
            r = subprocess.run(self.docker_run(), capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise SetupError(f"docker run failed ({r.returncode}): {r.stderr.strip()}")
            self.started, self._t0 = True, time.monotonic()
            return self

        def exit_code(self) -> int | None:
            r = self.run_docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", self.name)
            if r.returncode != 0:
                raise SetupError(f"container {self.name} is gone: {r.stderr.strip()}")
            running, code = r.stdout.split()
            return None if running == "true" else int(code)

        def sigterm(self) -> None:
            stop = [*self.docker, "stop", "-t", str(self.stop_timeout), self.name]
            self.stopper = subprocess.Popen(stop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def wait_exit(self, timeout: float) -> int | None:
            try:
                r = self.run_docker("wait", self.name, timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
            if self.stopper is not None:
                self.stopper.wait(timeout=30)
            code = int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
            return None if code == 137 else code  # 137: docker stop's SIGKILL after its timeout

        def kill(self) -> None:
            if self.started:
                self.run_docker("kill", self.name)

        def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
            if not self.started:
                return 0
            rc: int | None = None
            with contextlib.suppress(SetupError):
                rc = self.exit_code()
                if rc is None:
                    self.sigterm()
                    rc = self.wait_exit(timeout)
            r = self.run_docker("logs", self.name)
            self.log_path.write_text(r.stdout + r.stderr)
            self.run_docker("rm", "-f", self.name)
            self.started = False
            return -1 if rc is None else rc

        def log(self) -> str:
            if self.started:
                r = self.run_docker("logs", self.name)
                return r.stdout + r.stderr
            return super().log() if self.log_path.exists() else ""

        def cpu_seconds(self) -> float:
            return math.nan  # inside the container: not this host's /proc

    return ContainerServer()


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------


def make_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Deterministic photo-like JPEGs (a smooth scene, shapes, fine grain; quality 90, 4:2:0), so that decoding and
    resizing cost what a camera's photo costs. The repository's sample photos come first."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(p, folder / f"0-{p.name}")
        out.append(folder / f"0-{p.name}")
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        path = folder / f"photo{i}-{w}x{h}.jpg"
        scene = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(scene)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(w // 20, w // 3)), y0 + int(rng.integers(h // 20, h // 3))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        pixels = np.asarray(scene, dtype=np.int16) + rng.integers(-7, 8, (h, w, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(path, "JPEG", quality=90)
        out.append(path)
    return out


def preprocessed(paths: list[Path], size: int) -> Any:
    """The model's uint8 inputs (N, size, size, 3), decoded and resized as the server does."""
    import numpy as np

    from app.serving import imaging

    return np.stack([imaging.preprocess(imaging.decode(p.read_bytes(), 10**9), size) for p in paths])


# ----------------------------------------------------------------------------------------------------------------
# the kit
# ----------------------------------------------------------------------------------------------------------------


class Kit:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="mae-kit-"))
        self.logs = self.out / "servers.log"
        self.logs.write_text("")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.servers: list[Any] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.sampler: GpuSampler | None = None
        self.results: dict[str, Any] = {
            "kit": {
                "argv": sys.argv[1:],
                "device": args.device,
                "quick": args.quick,
                "budget_s": args.budget,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "python": platform.python_version(),
                "host": platform.node(),
                "cpus": os.cpu_count(),
            },
            "phases": {},
        }
        self.vitb: Path | None = None
        self.photos: list[Path] = []
        self.smoke_photos: list[Path] = []

    # ------------------------------------------------------------------ bookkeeping
    def write(self) -> None:
        self.results["kit"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        failed = [
            f"{name}: {c['name']}"
            for name, ph in self.results["phases"].items()
            for c in ph.get("checks", [])
            if not c["ok"]
        ]
        phases = self.results["phases"].items()
        broken = [f"{n}: {p['status']}" for n, p in phases if p["status"] in ("error", "timeout")]
        self.results["failed_checks"] = failed
        self.results["broken_phases"] = broken
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(rounded(self.results), indent=1))
        tmp.replace(self.out / "results.json")

    @staticmethod
    def check(rec: dict[str, Any], name: str, ok: bool, value: Any = None, want: Any = None) -> bool:
        rec.setdefault("checks", []).append({"name": name, "ok": bool(ok), "value": value, "want": want})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {value}" if value is not None else ""), flush=True)
        return bool(ok)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, budget: float, fn: Callable[[dict[str, Any]], None], need: float = 10.0) -> None:
        rec: dict[str, Any] = {"status": "running", "budget_s": budget}
        self.results["phases"][name] = rec
        timeout = min(budget, self.left())
        if budget <= 0 or timeout < need:
            rec["status"] = "skipped"
            rec["reason"] = "quick run" if budget <= 0 else f"{self.left():.0f} s left of the kit's budget"
            print(f"\n== {name}: skipped ({rec['reason']})", flush=True)
            self.write()
            return
        print(f"\n== {name} (up to {timeout:.0f} s)", flush=True)
        self.write()
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fn(rec)
            rec["status"] = "ok" if all(c["ok"] for c in rec.get("checks", [])) else "failed"
        except PhaseTimeout:
            rec["status"] = "timeout"
            rec["error"] = f"over its {timeout:.0f} s"
        except Exception as e:  # noqa: BLE001 - a broken phase must not stop the next
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            rec["traceback"] = traceback.format_exc()[-3000:]
            print(rec["traceback"], flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            with self.grace():
                self.cleanup()
            rec["seconds"] = round(time.monotonic() - t0, 1)
            print(f"== {name}: {rec['status']} in {rec['seconds']} s", flush=True)
            self.write()

    @contextlib.contextmanager
    def grace(self, seconds: float = 30.0) -> Iterator[None]:
        """Cleanup gets its own short alarm: a hung server stop must not hang the kit."""
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        except PhaseTimeout:
            print("cleanup ran out of time", flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def cleanup(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.children.clear()
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.stop(timeout=15)
            self.keep_log(s)
        self.servers.clear()

    def keep_log(self, server: Any, limit: int = 400_000) -> None:
        """Append the server's log (its tail, if long) to $OUT/servers.log: one file, however many servers."""
        with contextlib.suppress(OSError):
            text = server.log()
            if len(text) > limit:
                text = f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
            with open(self.logs, "a") as f:
                f.write(f"\n===== {server.label} (exit {server.proc.returncode if server.proc else None}) =====\n")
                f.write(text)

    # ------------------------------------------------------------------ servers and load
    def server(self, label: str, **env: str) -> Any:
        from tests.harness import ServerProcess

        base = {"MAE_API_KEYS": "", "MAE_LOG_LEVEL": "info", "MAE_SHUTDOWN_TIMEOUT_S": "20"}
        log = self.work / f"{label}.log"
        if self.args.container:
            s = container_server({**base, **env}, self.args.container, self.args.docker, log, label)
        else:
            s = ServerProcess({**base, **env}, log_path=log)
        s.label = label  # type: ignore[attr-defined]
        self.servers.append(s)
        s.start()
        print(f"  started {label}: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        return s

    def ready(self, s: Any, timeout: float) -> float:
        poll = 0.5 if self.args.container else 0.05  # each poll of a container is a docker call
        t = s.wait_ready(timeout=min(timeout, max(5.0, self.left())), poll_s=poll)
        print(f"  {s.label} ready in {t:.1f} s", flush=True)
        return t

    def stop(self, s: Any) -> int | None:
        rc = s.stop(timeout=30)
        self.keep_log(s)
        self.servers.remove(s)
        return rc

    def served_env(self, workers: int, **extra: str) -> dict[str, str]:
        a = self.args
        env = {"MAE_DEVICE": a.device, "MAE_DTYPE": a.dtype, "MAE_WORKERS": str(workers)}
        env["MAE_WEIGHTS"] = str(self.vitb or BUNDLED)
        env["MAE_MAX_BATCH_SIZE"] = str(a.max_batch)
        if a.device == "cpu":
            env["MAE_CPU_MAX_BATCH_SIZE"] = str(a.max_batch)
        return {**env, **extra}

    def measure(self, s: Any, path: str, warmup: float | None = None, window: float | None = None) -> dict[str, Any]:
        """Several load processes against `s`, a warm-up then a fixed window: throughput, latency, batch size,
        server CPU per image, GPU utilisation."""
        from tests.harness import metric_value

        a = self.args
        warmup, window = warmup or a.warmup, window or a.window
        photos = self.work / "photos"
        start_at = time.time() + 1.5  # the processes import and build their requests meanwhile
        outs = [self.work / f"load-{s.label}-{i}.json" for i in range(a.clients)]
        for i, out in enumerate(outs):
            cmd = [sys.executable, str(HERE / "load.py"), "--port", str(s.port), "--path", path]
            cmd += ["--photos", str(photos), "--concurrency", str(a.connections), "--start-at", str(start_at)]
            cmd += ["--warmup", str(warmup), "--window", str(window), "--offset", str(i), "--out", str(out)]
            self.children.append(subprocess.Popen(cmd, cwd=REPO))

        def probe() -> tuple[float, float, str]:
            return time.time(), s.cpu_seconds(), s.metrics()

        time.sleep(max(0.0, start_at + warmup - time.time()))
        p0 = probe()
        time.sleep(max(0.0, p0[0] + window - time.time()))
        p1 = probe()
        for p in self.children:
            p.wait(timeout=max(30.0, self.left()))
        self.children.clear()
        per = [json.loads(o.read_text()) for o in outs]
        lat = [x for r in per for x in r.pop("latencies_ms")]

        def delta(name: str, **labels: str) -> float:
            return metric_value(p1[2], name, **labels) - metric_value(p0[2], name, **labels)

        images = delta("mae_images_total")
        batches = delta("mae_batch_size_count")
        out = {
            "path": path,
            "clients": a.clients,
            "connections": a.clients * a.connections,
            "window_s": round(p1[0] - p0[0], 2),
            "images_per_s": sum(r["images_per_s"] for r in per),
            "latency_ms_p50": quantile(lat, 0.50),
            "latency_ms_p99": quantile(lat, 0.99),
            "answers": len(lat),
            "errors": sum(r["errors"] for r in per),
            "errors_by_status": [r["errors_by_status"] for r in per if r["errors"]],
            "unfinished": sum(r["unfinished"] for r in per),
            "mean_batch": delta("mae_batch_size_sum") / batches if batches else None,
            "model_images_per_s": images / (p1[0] - p0[0]),
            "server_cpu_ms_per_image": 1000 * (p1[1] - p0[1]) / images if images and p1[1] == p1[1] else None,
            "client_cpu_pct": [round(r["client_cpu_pct"], 1) for r in per],
            "window_skew_s": round(max(abs(r["window_wall"][0] - p0[0]) for r in per), 2),
        }
        if self.sampler:
            out.update(self.sampler.window(p0[0], p1[0]))
        print(
            f"  {s.label}: {out['images_per_s']:.1f} img/s, p50 {out['latency_ms_p50']} ms, p99 "
            f"{out['latency_ms_p99']} ms, batch {out['mean_batch']}, {out['server_cpu_ms_per_image']} CPU-ms/img, "
            f"GPU {out.get('gpu_util_pct')} %, errors {out['errors']}",
            flush=True,
        )
        return out

    # ------------------------------------------------------------------ phases
    def phase_env(self, rec: dict[str, Any]) -> None:
        a = self.args
        rec["install"] = bootstrap(a)
        rec["nvidia_smi"] = nvidia_smi()
        rec["torch"] = torch_info(a.device)
        if a.device == "cpu":
            import torch

            torch.set_num_threads(1)  # the dry run shares a small machine with its servers: no OpenMP team waits
        self.results["env"] = {**rec["torch"], "gpu_smi": rec["nvidia_smi"].get("name"), "driver": None}
        self.results["env"]["driver"] = rec["nvidia_smi"].get("driver_version")
        if a.device == "cuda":
            self.check(rec, "nvidia-smi answers", rec["nvidia_smi"].get("rc") == 0, rec["nvidia_smi"].get("raw"))
            self.check(rec, "torch.cuda.is_available()", rec["torch"]["cuda_available"])
            if not rec["torch"]["cuda_available"]:
                raise SetupError("no CUDA device: nothing of this kit means anything without one")
            self.check(rec, "a matrix product on the GPU is finite", rec["torch"].get("matmul_ok"))
            self.sampler = GpuSampler()
        sizes = QUICK_SIZES if a.quick else DEVICE_SIZES
        self.photos = make_photos(self.work / "photos", sizes)
        rec["photos"] = {p.name: p.stat().st_size for p in self.photos}
        smoke_sizes = [(1024, 768), (768, 1024), (1280, 720)]
        self.smoke_photos = make_photos(self.work / "smoke", smoke_sizes, seed=1)

    def phase_smoke(self, rec: dict[str, Any]) -> None:
        a = self.args
        dev = a.device
        ref = self.server("smoke-ref-cpu-fp32", MAE_DEVICE="cpu", MAE_DTYPE="float32")
        cands = {
            "float32": self.server(f"smoke-{dev}-fp32", MAE_DEVICE=dev, MAE_DTYPE="float32"),
            "bfloat16": self.server(f"smoke-{dev}-bf16", MAE_DEVICE=dev, MAE_DTYPE="bfloat16"),
        }
        if not a.container:  # in-process: this host's model, not the image's
            rec["precision_in_process"] = precision_variants(self.smoke_photos, dev)  # while the servers start
        for s in (ref, *cands.values()):
            self.ready(s, 120)
        answers = {"ref": served_answers(ref, self.smoke_photos)}
        self.check(rec, "reference /v1/models names cpu/float32", answers["ref"]["models"] == ("cpu", "float32"))
        limits = {"float32": (0.9999, 40.0, 1e-3), "bfloat16": (0.999, 30.0, 0.05)}
        rec["served"] = {}
        for dtype, s in cands.items():
            got = served_answers(s, self.smoke_photos)
            self.check(rec, f"{dtype}: /v1/models names {dev}/{dtype}", got["models"] == (dev, dtype), got["models"])
            self.check(rec, f"{dtype}: reconstruct JSON keys exact", got["recon_keys_ok"], got["recon_keys"])
            self.check(rec, f"{dtype}: embed JSON keys exact", got["embed_keys_ok"], got["embed_keys"])
            cmp = compare_answers(answers["ref"], got)
            rec["served"][dtype] = cmp
            min_cos, min_psnr, max_mse = limits[dtype]
            cos = min(cmp["cos_cls"]["min"], cmp["cos_mean"]["min"])
            self.check(rec, f"{dtype}: embedding cosine vs CPU fp32 >= {min_cos}", cos >= min_cos, cos)
            p = cmp["recon_psnr_db"]["min"]
            self.check(rec, f"{dtype}: reconstruction PSNR vs CPU fp32 >= {min_psnr} dB", p >= min_psnr, p)
            m = cmp["mse_rel_diff"]["max"]
            self.check(rec, f"{dtype}: JSON mse within {max_mse:.0e} (relative) of CPU fp32", m <= max_mse, m)
            self.check(rec, f"{dtype}: same masks for the same seeds", cmp["masks_equal"])

    def build_vitb(self) -> Path:
        """A random ViT-B (too large to carry), saved where the servers load it; the small bundled model in --quick."""
        if self.vitb is None:
            if self.args.weights:
                self.vitb = Path(self.args.weights)
            elif self.args.quick:
                self.vitb = BUNDLED
            else:
                import torch

                from model import MAE, get_config
                from model.formats import save

                torch.manual_seed(0)
                self.vitb = self.work / "vitb-random.safetensors"
                save(MAE(get_config(self.args.model)), self.vitb)
        return self.vitb

    def phase_ceiling(self, rec: dict[str, Any]) -> None:
        a = self.args
        path = self.build_vitb()
        rec["model"] = a.weights or ("bundled mae_vit_demo_patch16" if a.quick else f"{a.model}, random weights")
        rec["rows"] = ceiling(path, self.photos, a.device, a.batches, a.min_time)
        ok = all(r["images_per_s"] > 0 for r in rec["rows"])
        self.check(rec, "every batch size ran", ok and len(rec["rows"]) == 2 * 2 * len(a.batches))
        if a.device == "cuda":
            fp32 = [r for r in rec["rows"] if r["dtype"] == "float32" and r["op"] == "reconstruct"]
            peak = max(r.get("peak_mib", 0) for r in fp32)
            rec["oom_split"] = got = oom_split(path, max(a.batches), peak)
            ok = got["answered"] == got["n"] and got["splits"] > 0
            self.check(rec, "an out-of-memory batch is split and answered whole", ok, got)

    def phase_http(self, rec: dict[str, Any]) -> None:
        a = self.args
        self.build_vitb()
        rec["runs"] = {}
        last = None
        for i, w in enumerate(a.workers):
            s = self.server(f"http-w{w}", **self.served_env(w))
            rec.setdefault("ready_s", {})[str(w)] = round(self.ready(s, 120), 1)
            run = self.measure(s, a.route)
            rec["runs"][str(w)] = run
            self.check(rec, f"workers={w}: answers and no errors", run["answers"] > 0 and run["errors"] == 0)
            if i < len(a.workers) - 1:
                self.stop(s)
            last = s
        assert last is not None
        rec["drain"] = drain(last, "/v1/reconstruct?seed=1&format=png", self.photos, a.drain_connections)
        d = rec["drain"]
        self.check(rec, "drain: SIGTERM came with requests in flight", d["in_flight_at_sigterm"] > 0, d)
        self.check(rec, "drain: every request sent before SIGTERM got 200 or 503", not d["lost"], d["lost"])
        self.check(rec, "drain: exit status 0", d["exit_code"] == 0, d["exit_code"])

    def phase_jpeg(self, rec: dict[str, Any]) -> None:
        a = self.args
        try:
            import torchvision  # noqa: F401

            from app.serving import jpeg_gpu
        except ImportError as e:
            rec["reason"] = f"not importable: {e}"
            self.check(rec, "torchvision and app.serving.jpeg_gpu import", a.device == "cpu", str(e))
            return
        rec["pixels"] = jpeg_pixels(self.photos, a.device, jpeg_gpu)
        worst = min(r["psnr_db"] for r in rec["pixels"])
        self.check(rec, "GPU-decoded inputs within 35 dB PSNR of the CPU path", worst >= 35.0, worst)
        if a.device != "cuda":
            return  # MAE_JPEG_DECODE=cuda refuses to start without CUDA (a unit test checks it)
        s = self.server("jpeg-cuda", **self.served_env(a.compile_workers, MAE_JPEG_DECODE="cuda"))
        rec["ready_s"] = round(self.ready(s, 120), 1)
        rec["run"] = self.measure(s, a.route)
        ok = rec["run"]["answers"] > 0 and not rec["run"]["errors"]
        self.check(rec, "MAE_JPEG_DECODE=cuda: answers and no errors", ok)

    def phase_compile(self, mode: str) -> Callable[[dict[str, Any]], None]:
        def run(rec: dict[str, Any]) -> None:
            a = self.args
            self.build_vitb()
            s = self.server(f"compile-{mode}", **self.served_env(a.compile_workers, MAE_COMPILE=mode))
            rec["ready_s"] = round(self.ready(s, max(10.0, self.left())), 1)  # compiles during its warm-up
            # A longer warm-up: the engine forms batch sizes the start-up warm-up never saw.
            rec["run"] = self.measure(s, a.route, warmup=a.warmup * 2)
            ok = rec["run"]["answers"] > 0 and not rec["run"]["errors"]
            self.check(rec, f"MAE_COMPILE={mode}: answers and no errors", ok)
            rec["recompile_lines"] = sum("recompil" in line.lower() for line in s.log().splitlines())

        return run

    def run(self) -> int:
        a = self.args
        signal.signal(signal.SIGALRM, _alarm)
        self.phase("env", 90, self.phase_env, need=5)
        env = self.results["phases"]["env"]
        if env["status"] not in ("ok", "failed"):
            print(f"cannot go on: {env.get('error')}", flush=True)
            return 2
        # The dry run's limits are loose: it shares two busy cores. The device's add up to its budget.
        q = a.quick
        self.phase("smoke", 100 if q else 70, self.phase_smoke)
        if a.container:  # the image's servers only: the in-process phases would measure this host
            self.phase("http", 100 if q else 110, self.phase_http, need=20)
        else:
            self.phase("ceiling", 60 if q else 45, self.phase_ceiling)
            self.phase("http", 100 if q else 110, self.phase_http, need=20)
            self.phase("jpeg_decode", 40 if q else 45, self.phase_jpeg)
            self.phase("compile_default", 0 if q else 70, self.phase_compile("default"), need=40)
            self.phase("compile_reduce_overhead", 0 if q else 80, self.phase_compile("reduce-overhead"), need=40)
        if self.sampler:
            self.sampler.close()
        self.write()
        shutil.rmtree(self.work, ignore_errors=True)
        print(f"\nresults: {self.out / 'results.json'} ({self.results['kit']['elapsed_s']} s)", flush=True)
        print(report(self.results), flush=True)
        bad = self.results["failed_checks"] + self.results["broken_phases"]
        for line in bad:
            print(f"FAILED {line}", flush=True)
        return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------------
# smoke: the served answers, the in-process precision variants
# ----------------------------------------------------------------------------------------------------------------


def served_answers(s: Any, photos: list[Path]) -> dict[str, Any]:
    """/v1/models, then for every photo an embedding (pool=all) and a JSON reconstruction with a fixed seed."""
    import base64

    import httpx
    import numpy as np
    from PIL import Image

    out: dict[str, Any] = {"embed": [], "recon": []}
    with httpx.Client(base_url=s.url, timeout=120) as c:
        m = c.get("/v1/models").raise_for_status().json()["models"][0]
        out["models"] = (m["device"].split(":")[0], m["dtype"])
        for i, p in enumerate(photos):
            files = {"image": (p.name, p.read_bytes(), "image/jpeg")}
            e = c.post("/v1/embed", params={"pool": "all"}, files=files).raise_for_status().json()
            r = c.post("/v1/reconstruct", params={"format": "json", "seed": i}, files=files).raise_for_status().json()
            out["embed_keys"], out["recon_keys"] = sorted(e), sorted(r)
            out["embed_keys_ok"] = set(e) == EMBED_KEYS
            out["recon_keys_ok"] = set(r) == RECONSTRUCT_KEYS and set(r["images"]) == VIEWS
            out["embed"].append({k: np.asarray(e[k], np.float64) for k in ("cls", "mean", "patches")})
            png = base64.b64decode(r["images"]["reconstruction"])
            out["recon"].append(
                {"pixels": np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), "mse": r["mse"], "mask": r["mask"]}
            )
    return out


def compare_answers(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    cls = [cosine(a["cls"], b["cls"]) for a, b in zip(ref["embed"], got["embed"], strict=True)]
    mean = [cosine(a["mean"], b["mean"]) for a, b in zip(ref["embed"], got["embed"], strict=True)]
    tokens = [
        cosine(x, y)
        for a, b in zip(ref["embed"], got["embed"], strict=True)
        for x, y in zip(a["patches"], b["patches"], strict=True)
    ]
    pairs = list(zip(ref["recon"], got["recon"], strict=True))
    return {
        "cos_cls": summary(cls),
        "cos_mean": summary(mean),
        "cos_patch_tokens": summary(tokens),
        "recon_psnr_db": summary([psnr_u8(a["pixels"], b["pixels"]) for a, b in pairs]),
        "mse_ref": [a["mse"] for a, _ in pairs],
        "mse": [b["mse"] for _, b in pairs],
        "mse_rel_diff": summary([abs(b["mse"] - a["mse"]) / max(a["mse"], 1e-12) for a, b in pairs]),
        "masks_equal": all(a["mask"] == b["mask"] for a, b in pairs),
    }


def precision_variants(photos: list[Path], device: str) -> dict[str, Any]:
    """The bundled model in-process on `device` against fp32 on the CPU, one batch of the photos:

    fp32            as served (PyTorch's TF32 defaults: cuDNN convolutions may use TF32, matmuls not)
    fp32_no_tf32    TF32 off everywhere
    bf16            as served: the whole model cast, so the pixel mean/std (and position tables) are bf16 and
                    the input pixels are rounded to bf16 before normalising; the JSON mse is against them
    bf16_fp32_norm  bf16 weights, but the input normalised and the output denormalised (and its mse) in fp32
    """
    import torch

    from app.serving.model_thread import to_input
    from model.formats import load
    from model.masking import Masking, len_keep_for_ratio, random_noise
    from model.outputs import to_uint8

    size = 224
    x8 = torch.from_numpy(preprocessed(photos, size))
    n = x8.shape[0]
    ref_model = load(BUNDLED).model.eval()
    L = ref_model.config.num_patches
    masking = Masking(random_noise(n, L, seed=0), len_keep_for_ratio(L, 0.75))

    def run(model: Any, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        x = to_input(x8, dev, dtype)
        with torch.inference_mode():
            e = model.encode(x)
            r = model.reconstruct(x, masking)
            return {
                "cls": e.cls.float().cpu(),
                "mean": e.mean.float().cpu(),
                "pixels": to_uint8(r.pixels.float()).cpu(),
                "mse": r.mse.float().cpu(),
            }

    ref = run(ref_model, torch.device("cpu"), torch.float32)
    dev = torch.device(device)
    out: dict[str, Any] = {}
    variants = ["fp32", "fp32_no_tf32", "bf16", "bf16_fp32_norm"] if device == "cuda" else ["bf16", "bf16_fp32_norm"]
    for name in variants:
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        model = load(BUNDLED).model.to(dev, dtype).eval()
        in_dtype = dtype
        if name == "bf16_fp32_norm":
            model.pixel_mean, model.pixel_std = model.pixel_mean.float(), model.pixel_std.float()
            normalize, viewer = model.normalize, model.viewer_output
            model.normalize = lambda im, f=normalize: f(im.float()).to(torch.bfloat16)
            model.viewer_output = lambda im, patches, *rest, f=viewer: f(im, patches.float(), *rest)
            in_dtype = torch.float32
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if name == "fp32_no_tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            got = run(model, dev, in_dtype)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        out[name] = {
            "cos_cls": summary([cosine(a, b) for a, b in zip(ref["cls"], got["cls"], strict=True)]),
            "cos_mean": summary([cosine(a, b) for a, b in zip(ref["mean"], got["mean"], strict=True)]),
            "recon_psnr_db": summary([psnr_u8(a, b) for a, b in zip(ref["pixels"], got["pixels"], strict=True)]),
            "mse_rel_diff": summary(
                [abs(float(b) - float(a)) / max(float(a), 1e-12) for a, b in zip(ref["mse"], got["mse"], strict=True)]
            ),
        }
        del model
    return out


# ----------------------------------------------------------------------------------------------------------------
# ceiling, OOM split, drain, JPEG pixels
# ----------------------------------------------------------------------------------------------------------------


def entry_for(path: Path, device: str, dtype: Any) -> Any:
    import torch

    from app.serving.registry import ModelEntry
    from model.formats import load

    loaded = load(path)
    model = loaded.model.to(torch.device(device), dtype).eval()
    return ModelEntry("kit", model, str(path), loaded.format, loaded.sha256, torch.device(device), dtype)


def ceiling(path: Path, photos: list[Path], device: str, batches: list[int], min_time: float) -> list[dict[str, Any]]:
    """images/s of the engine's forward (app.serving.model_thread.forward) per dtype, op and batch size."""
    import torch

    from app.serving.model_thread import forward
    from model.masking import Masking, len_keep_for_ratio, random_noise

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        entry = entry_for(path, device, dtype)
        c = entry.config
        pics = torch.from_numpy(preprocessed(photos, c.img_size))
        pool = pics[torch.arange(max(batches)) % pics.shape[0]].contiguous()
        for op, ratio in (("embed", 0.0), ("reconstruct", 0.75)):
            for b in batches:
                masking = Masking(random_noise(b, c.num_patches, seed=b), len_keep_for_ratio(c.num_patches, ratio))
                m = masking if op == "reconstruct" else None

                def call(b: int = b, m: Any = m, op: str = op, entry: Any = entry, pool: Any = pool) -> None:
                    forward(entry, op, pool[:b], m)
                    if device == "cuda":
                        torch.cuda.synchronize()

                call()
                call()
                times = []
                t_end = time.perf_counter() + min_time
                while len(times) < 3 or time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                    if len(times) >= 200:
                        break
                med = statistics.median(times)
                row = {"dtype": str(dtype).removeprefix("torch."), "op": op, "batch": b, "ms": med * 1e3}
                row["images_per_s"] = b / med
                if device == "cuda":
                    row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
                    torch.cuda.reset_peak_memory_stats()
                rows.append(row)
                print(f"  {row['dtype']:>8} {op:<11} b={b:<3}: {med * 1e3:8.2f} ms {b / med:9.1f} img/s", flush=True)
        del entry
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def oom_split(path: Path, n: int, peak_mib: float) -> dict[str, Any]:
    """A batch too large for a capped allocator: app.serving.model_thread.compute must split it and answer all.
    `peak_mib`: the ceiling's peak for fp32 reconstruct at this batch size, weights included."""
    import logging

    import numpy as np
    import torch

    from app.serving import model_thread
    from model.masking import Masking, len_keep_for_ratio, random_noise

    entry = entry_for(path, "cuda", torch.float32)
    c = entry.config
    images = [np.full((c.img_size, c.img_size, 3), i % 255, np.uint8) for i in range(n)]
    masking = Masking(random_noise(n, c.num_patches, seed=0), len_keep_for_ratio(c.num_patches, 0.75))
    torch.cuda.synchronize()
    model_mib = torch.cuda.memory_allocated() / 2**20
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    cap = model_mib + max(256.0, 0.3 * (peak_mib - model_mib))  # room for about a quarter of the batch
    splits: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            splits.append(record.getMessage())

    log = logging.getLogger("mae.model_thread")
    handler = Count(logging.WARNING)
    log.addHandler(handler)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    t0 = time.perf_counter()
    try:
        answered = len(model_thread.compute(model_thread.forward, entry, "reconstruct", images, masking))
        error = None
    except Exception as e:  # noqa: BLE001 - recorded as the check's value
        answered, error = 0, f"{type(e).__name__}: {e}"[:500]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        log.removeHandler(handler)
    seconds = round(time.perf_counter() - t0, 2)
    out = {"n": n, "answered": answered, "splits": len(splits), "cap_mib": round(cap), "seconds": seconds}
    return {**out, "error": error}


def drain(s: Any, path: str, photos: list[Path], connections: int, margin: float = 0.05) -> dict[str, Any]:
    """Closed-loop load; once the first answers are in and a request has been in flight for longer than twice
    `margin` (or half the typical answer time, where answers come faster), SIGTERM. Every request sent `margin` or
    more before the signal must get 200 or 503 (later ones may be refused: the listener closes). The server must
    exit 0."""
    import asyncio

    from bench.loadgen import Conn, multipart_request

    payloads = [multipart_request(s.host, s.port, path, p.name, p.read_bytes(), "image/jpeg") for p in photos]
    records: list[tuple[float, float, int]] = []
    outstanding: dict[int, float] = {}  # client -> when its current request was sent
    sent_at: list[float] = []

    async def client(i: int, stop: asyncio.Event) -> None:
        conn = Conn(s.host, s.port)
        k = i
        while not stop.is_set():
            t0 = outstanding[i] = time.monotonic()
            try:
                status = (await asyncio.wait_for(conn.request(payloads[k % len(payloads)]), 120))[0]
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                status = 0
                await conn.close()
            del outstanding[i]
            records.append((t0, time.monotonic(), status))
            k += connections
            if status == 0 and sent_at:
                break
        await conn.close()

    async def main() -> None:
        nonlocal margin
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(i, stop)) for i in range(connections)]
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            now = time.monotonic()
            answered = [r[1] - r[0] for r in records[-50:] if r[2] == 200]
            # A server answering faster than the margin (the CPU dry run's tiny model) may never hold a request that
            # long: the margin shrinks to half the typical answer time (10 ms at least, for the request to be read)
            m = min(margin, max(0.01, statistics.median(answered) / 2)) if answered else margin
            if answered and any(now - t > 2 * m for t in outstanding.values()):
                margin = m
                break
            await asyncio.sleep(0.002)
        sent_at.append(time.monotonic())
        s.sigterm()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait(tasks, timeout=60)

    asyncio.run(main())
    sent = sent_at[0]
    rc = s.wait_exit(60)
    before = [r for r in records if r[0] < sent - margin]
    tally: dict[str, int] = {}
    for r in before:
        tally[str(r[2])] = tally.get(str(r[2]), 0) + 1
    return {
        "connections": connections,
        "margin_s": round(margin, 4),
        "sent_before_sigterm": len(before),
        "in_flight_at_sigterm": sum(r[1] > sent for r in before),
        "statuses_before_sigterm": tally,
        "lost": sum(r[2] not in (200, 503) for r in before),
        "after_sigterm": len(records) - len(before),
        "exit_code": rc,
    }


def jpeg_pixels(photos: list[Path], device: str, jpeg_gpu: Any) -> list[dict[str, Any]]:
    """Each photo through the CPU path (Pillow decode + bicubic) and through app.serving.jpeg_gpu on `device`:
    the model's uint8 inputs compared, and the time of each (median of 3)."""
    import numpy as np
    import torch

    from app.serving import imaging

    rows = []
    for p in photos:
        data = p.read_bytes()
        for mode in ("squash", "crop"):

            def cpu(data: bytes = data, mode: str = mode) -> Any:
                return imaging.preprocess(imaging.decode(data, 10**9), 224, mode)  # type: ignore[arg-type]

            def gpu(data: bytes = data, mode: str = mode) -> Any:
                return jpeg_gpu.decode_preprocess(data, 224, mode, torch.device(device), 10**9, 32)

            times = {}
            for name, fn in (("cpu", cpu), ("gpu", gpu)):
                fn()
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    img = fn()
                    ts.append(time.perf_counter() - t0)
                times[name] = (statistics.median(ts) * 1e3, img)
            a, b = times["cpu"][1], times["gpu"][1]
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
            rows.append(
                {
                    "photo": p.name,
                    "mode": mode,
                    "psnr_db": psnr_u8(a, b),
                    "max_abs": int(diff.max()),
                    "mean_abs": float(diff.mean()),
                    "cpu_ms": times["cpu"][0],
                    "gpu_ms": times["gpu"][0],
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the report: results.json -> the Markdown of BENCHMARKS.md's GPU section
# ----------------------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    if x == "inf":
        return "∞ (equal)"
    return "–" if x is None or isinstance(x, str) else fmt.format(x)


def report(r: dict[str, Any]) -> str:
    env, ph = r.get("env", {}), r.get("phases", {})
    lines = [
        f"Device: {env.get('gpu') or env.get('gpu_smi') or 'none (' + r['kit']['device'] + ')'}, driver "
        f"{env.get('driver') or '–'}, torch {env.get('torch')} (CUDA {env.get('cuda_build')}), torchvision "
        f"{env.get('torchvision')}; kit run {r['kit']['started']}, {r['kit'].get('elapsed_s')} s"
        + (" (--quick dry run)" if r["kit"].get("quick") else ""),
        "",
        "| phase | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {p['status']} | {p.get('seconds', '–')} |" for n, p in ph.items()]
    smoke = ph.get("smoke", {})
    if smoke.get("served") or smoke.get("precision_in_process"):
        lines += ["", "| vs fp32 on the CPU | min cos CLS | min cos mean | min recon PSNR dB | max mse rel. diff |"]
        lines += ["|---|---|---|---|---|"]
        for where, rows in (("served", smoke.get("served", {})), ("in-process", smoke.get("precision_in_process", {}))):
            for name, v in rows.items():
                lines.append(
                    f"| {name} ({where}) | {_f(v['cos_cls']['min'], '{:.6f}')} | {_f(v['cos_mean']['min'], '{:.6f}')} "
                    f"| {_f(v['recon_psnr_db']['min'], '{:.1f}')} | {_f(v['mse_rel_diff']['max'], '{:.2e}')} |"
                )
    rows = ph.get("ceiling", {}).get("rows", [])
    if rows:
        batches = sorted({x["batch"] for x in rows})
        lines += ["", "Bare model (engine forward, copies included), images/s:", ""]
        lines += ["| dtype | op | " + " | ".join(f"b={b}" for b in batches) + " |", "|---|---|" + "---|" * len(batches)]
        for dtype in ("float32", "bfloat16"):
            for op in ("embed", "reconstruct"):
                got = {x["batch"]: x["images_per_s"] for x in rows if x["dtype"] == dtype and x["op"] == op}
                lines.append(f"| {dtype} | {op} | " + " | ".join(_f(got.get(b), "{:.0f}") for b in batches) + " |")
    runs = []
    for w, run in ph.get("http", {}).get("runs", {}).items():
        runs.append((f"MAE_WORKERS={w}", run))
    if ph.get("jpeg_decode", {}).get("run"):
        runs.append(("MAE_JPEG_DECODE=cuda", ph["jpeg_decode"]["run"]))
    for mode in ("default", "reduce_overhead"):
        if ph.get(f"compile_{mode}", {}).get("run"):
            runs.append((f"MAE_COMPILE={mode.replace('_', '-')}", ph[f"compile_{mode}"]["run"]))
    if runs:
        lines += ["", "Through HTTP (photo-sized JPEGs, closed loop):", ""]
        lines += ["| server | conns | img/s | p50 ms | p99 ms | mean batch | server CPU-ms/img | GPU util % | errors |"]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for label, x in runs:
            lines.append(
                f"| {label} | {x['connections']} | {_f(x['images_per_s'])} | {_f(x['latency_ms_p50'], '{:.0f}')} | "
                f"{_f(x['latency_ms_p99'], '{:.0f}')} | {_f(x['mean_batch'])} | {_f(x['server_cpu_ms_per_image'])} | "
                f"{_f(x.get('gpu_util_pct'), '{:.0f}')} | {x['errors']} |"
            )
    d = ph.get("http", {}).get("drain")
    if d:
        n, lost, rc = d["in_flight_at_sigterm"], d["lost"], d["exit_code"]
        lines += ["", f"Drain: {n} requests in flight at SIGTERM, {lost} lost, exit status {rc}."]
    px = ph.get("jpeg_decode", {}).get("pixels")
    if px:
        lines += [
            "",
            f"GPU JPEG decode vs the CPU path: worst PSNR {min(x['psnr_db'] for x in px):.1f} dB, max abs "
            f"{max(x['max_abs'] for x in px)}; median decode+resize "
            f"{statistics.median(x['cpu_ms'] for x in px):.1f} ms (CPU) vs "
            f"{statistics.median(x['gpu_ms'] for x in px):.1f} ms (GPU path) per photo.",
        ]
    bad = r.get("failed_checks", []) + r.get("broken_phases", [])
    lines += ["", "Failed: " + "; ".join(bad) if bad else "All checks passed."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit status: 0 pass, 1 fail, 2 error.")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda on the device; cpu: the dry run")
    p.add_argument("--quick", action="store_true", help="the dry run's sizes: bundled model, tiny windows")
    p.add_argument("--out", default=os.environ.get("OUT") or "kit-out", help="where results.json goes (default $OUT)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 345; quick 300)")
    p.add_argument("--wheelhouse", default=str(REPO / ".wheelhouse"))
    p.add_argument("--site", default="/tmp/mae-kit-site", help="where the wheels are installed")
    p.add_argument("--install", choices=["auto", "always", "never"], default="auto", help="auto: when needed")
    p.add_argument("--model", default="mae_vit_base_patch16", help="the served and measured architecture")
    p.add_argument("--weights", help="serve and measure this file instead (default: --model, random weights)")
    p.add_argument("--dtype", default=None, help="MAE_DTYPE of the HTTP phases (default bfloat16 on cuda)")
    p.add_argument("--max-batch", type=int, default=None, help="MAE_MAX_BATCH_SIZE (default 32; quick 4)")
    p.add_argument("--workers", default=None, help="MAE_WORKERS values (default 1,8,14; quick 1,2)")
    p.add_argument("--compile-workers", type=int, default=8, help="MAE_WORKERS of the JPEG and compile phases")
    p.add_argument("--clients", type=int, default=None, help="load-generator processes (default 4; quick 2)")
    p.add_argument("--connections", type=int, default=None, help="connections per process (default 16; quick 2)")
    p.add_argument("--drain-connections", type=int, default=None, help="(default 64; quick 4)")
    p.add_argument("--route", default="/v1/embed?pool=cls", help="what the load asks for")
    p.add_argument("--warmup", type=float, default=None, help="seconds (default 3; quick 1)")
    p.add_argument("--window", type=float, default=None, help="seconds (default 6; quick 1.5)")
    p.add_argument("--batches", default=None, help="ceiling batch sizes (default 1,2,4,...,256; quick 1,2,4)")
    p.add_argument("--min-time", type=float, default=None, help="ceiling seconds per point (default 0.3)")
    p.add_argument(
        "--container",
        metavar="IMAGE",
        help="on a GPU host with Docker: the servers as containers of IMAGE (hardened as docker-compose.yml runs "
        "them; --gpus all for cuda), smoke and HTTP phases only; the in-process model is left out",
    )
    p.add_argument("--docker", default="docker", help="the docker command (default: docker)")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the Markdown of a results.json and exit")
    a = p.parse_args(argv)
    q = a.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    a.budget = pick(a.budget, 345.0, 300.0)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.max_batch = pick(a.max_batch, 32, 4)
    one = "1" if a.container else None  # one server process per container, as deployed
    a.workers = [int(w) for w in pick(a.workers, one or "1,8,14", one or "1,2").split(",")]
    a.compile_workers = 2 if q and a.compile_workers == 8 else a.compile_workers
    a.clients = pick(a.clients, 4, 2)
    a.connections = pick(a.connections, 16, 2)
    a.drain_connections = pick(a.drain_connections, 64, 4)
    a.warmup = pick(a.warmup, 3.0, 1.0)
    a.window = pick(a.window, 6.0, 1.5)
    a.batches = [int(b) for b in pick(a.batches, "1,2,4,8,16,32,64,128,256", "1,2,4").split(",")]
    a.min_time = pick(a.min_time, 0.3, 0.05)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        print(report(json.loads(Path(a.report).read_text())))
        return 0
    return Kit(a).run()


if __name__ == "__main__":
    sys.exit(main())
