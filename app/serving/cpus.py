"""How many CPUs this process may really use, how many of them the model's torch threads get, and how the process's
CPU runtime (OpenMP, malloc) is tuned before torch loads.

torch's default is the host's core count, whatever the process may use: under a container's CPU limit (a cgroup
quota) or a CPU affinity mask that oversubscribes the process, and OpenMP threads that wait on each other collapse
when one of their cores is taken by someone else (BENCHMARKS.md: the CPU-hog run of bench/host_path.py). So:
count the CPUs from the affinity mask and the cgroup quota, and keep some for decoding and encoding, which run
beside the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Literal

log = logging.getLogger("mae.cpus")

OmpWait = Literal["auto", "passive", "spin"]
SPIN_COUNT = "300000"  # libgomp's own default when no policy is set
SPIN_MARGIN = 1.05  # spinning costs idle CPU under light load: keep it only for a clear gain
RUNTIME_ENV = "MAE_RUNTIME_CHOICE"  # what prepare_runtime chose, for this process's children and /v1/models
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

# glibc mallopt parameters, and what mae-serve sets them to (`prepare_runtime`).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # blocks under this come from the heap and are reused (32 MiB: glibc's upper bound)
TRIM_THRESHOLD = 256 * 2**20  # free memory kept at a heap's top before any is given back to the system


def prepare_runtime(omp_wait: OmpWait = "passive", gpu: bool = False) -> str:
    """Tune this process's CPU runtime; call before torch is imported (mae-serve's first step). Returns a line for
    the log. Child processes (HTTP workers, the model process) inherit the environment part.

    - How long OpenMP's idle threads spin before they sleep (MAE_OMP_WAIT): `passive` sleeps at once
      (OMP_WAIT_POLICY=PASSIVE): spinning after every parallel region took a third of a small model's server CPU,
      from the cores decoding and encoding need. `spin` keeps libgomp's spinning (GOMP_SPINCOUNT), which a large
      model on the CPU can gain from between its layers. `auto` times both on this machine (`calibrate_wait`,
      cached per CPU and torch version) and keeps spinning only where it is faster by SPIN_MARGIN. An
      OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment always wins; on a GPU host the model has one thread
      and nothing is timed.
    - malloc keeps freed blocks under 32 MiB for reuse: glibc's default maps each batch-sized tensor (a few MiB)
      fresh from the kernel and unmaps it when freed, so every batch pays a page fault per 4 KiB of each tensor.
    """
    if RUNTIME_ENV in os.environ:  # a process mae-serve started (a worker): the choice came with the environment
        why = str(runtime_report().get("chosen_by", "inherited"))
    else:
        if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
            why = "set in the environment"
        else:
            if omp_wait == "auto" and not gpu:
                omp_wait, why = calibrate_wait()
            else:
                why = "MAE_OMP_WAIT" if not gpu else "model on a GPU"
            if omp_wait == "spin":
                os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
            else:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        policy = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
        os.environ[RUNTIME_ENV] = json.dumps({"omp": policy, "chosen_by": why, **cpu_features()})
    policy = str(runtime_report()["omp"])
    malloc = f"malloc reuses freed blocks under {MMAP_THRESHOLD >> 20} MiB" if keep_freed_memory() else "malloc untuned"
    return f"OpenMP idle threads: {policy} ({why}); {malloc}; CPU: {describe_cpu()}"


def runtime_report() -> dict[str, object]:
    """What prepare_runtime chose, the figures behind it and the CPU's features (for /v1/models)."""
    try:
        report: dict[str, object] = json.loads(os.environ.get(RUNTIME_ENV, "{}"))
    except ValueError:
        report = {}
    return report or {"omp": "untuned", "chosen_by": "prepare_runtime did not run", **cpu_features()}


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model and the instruction sets that decide its fastest kernels."""
    model, flags = "unknown", set[str]()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "features": [f for f in FEATURES if f in flags]}


def describe_cpu() -> str:
    f = cpu_features()
    return f"{f['cpu']} ({', '.join(f['features']) or 'no AVX2'})"  # type: ignore[arg-type]


# A transformer stack at a served batch's shape (8 images, 50 visible tokens, ViT-S wide): thousands of short
# parallel regions, where the idle threads' wait decides the speed. Prints the best seconds of a pass.
_CALIBRATION = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, batch_first=True, norm_first=True)
stack = torch.nn.Sequential(*[layer] * 6).eval()
x = torch.randn(8, 50, 384)
with torch.inference_mode():
    for _ in range(3):
        stack(x)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        stack(x)
        times.append(time.perf_counter() - t)
print(min(times))
"""


def calibrate_wait(cache_dir: Path | None = None) -> tuple[OmpWait, str]:
    """Time the calibration stack with idle threads sleeping and spinning, each in a fresh process (libgomp reads
    its policy once, at load), twice in turn; keep spinning only if its best pass is faster by SPIN_MARGIN. Cached."""
    import subprocess
    import sys

    threads = torch_threads_for(available_cpus()[0], on_gpu=False)
    if threads == 1:
        return "passive", "one model thread: nothing to wait for"
    key = hashlib.sha256(json.dumps([cpu_features(), threads, _torch_version(), SPIN_COUNT]).encode()).hexdigest()
    cache = (cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "mae-serve") / f"omp-{key[:16]}.json"
    try:
        cached = json.loads(cache.read_text())
        return cached["choice"], cached["why"] + " (cached)"
    except (OSError, ValueError, KeyError):
        pass
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    runs: dict[str, list[float]] = {"passive": [], "spin": []}
    try:
        for _ in range(2):  # in turn, twice: a burst of other load hits both, and the best of each is kept
            for name, env in (("passive", {"OMP_WAIT_POLICY": "PASSIVE"}), ("spin", {"GOMP_SPINCOUNT": SPIN_COUNT})):
                out = subprocess.run([sys.executable, "-c", _CALIBRATION, str(threads)], env={**clean, **env},
                                     capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
                runs[name].append(float(out.stdout.split()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return "passive", f"calibration failed ({type(e).__name__}): passive"
    passive, spin = min(runs["passive"]), min(runs["spin"])
    choice: OmpWait = "spin" if spin * SPIN_MARGIN < passive else "passive"
    why = f"timed here: {threads} threads, passive {passive * 1e3:.2f} ms, spin {spin * 1e3:.2f} ms"
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"choice": choice, "why": why}))
    return choice, why


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def keep_freed_memory() -> bool:
    """glibc: serve blocks under MMAP_THRESHOLD from the heap and give memory back only past TRIM_THRESHOLD
    (`prepare_runtime`). False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup allows (quota / period), cgroup v2 or v1; None when unlimited or unknown."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota_us = int(q.read_text())
            return None if quota_us <= 0 else quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> tuple[float, int, float | None]:
    """(CPUs this process may use, CPUs in its affinity mask, the cgroup quota or None)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota()
    return (min(affinity, quota) if quota else float(affinity)), affinity, quota


def torch_threads_for(cpus: float, on_gpu: bool) -> int:
    """Threads for the model: on a GPU one (the device computes; CPU threads only launch kernels), on a CPU all but
    a quarter of the CPUs, rounded down, which are left to decoding and encoding: 2 CPUs -> 2, 4 -> 3, 16 -> 12.
    (On 2 CPUs both go to the model: a large model is most of the work there; BENCHMARKS.md has the measurements.)"""
    if on_gpu:
        return 1
    whole = max(1, math.floor(cpus))
    return max(1, whole - whole // 4)


def configure_torch_threads(setting: int, on_gpu: bool) -> int:
    """Apply MAE_TORCH_THREADS (0 = from the CPUs available, `torch_threads_for`); log the choice; return it."""
    import torch

    cpus, affinity, quota = available_cpus()
    threads = setting or torch_threads_for(cpus, on_gpu)
    torch.set_num_threads(threads)
    log.info(
        "torch threads: %d (MAE_TORCH_THREADS=%d; CPUs available: %g, affinity %d, cgroup quota %s; %s)",
        threads,
        setting,
        cpus,
        affinity,
        "none" if quota is None else f"{quota:g}",
        "model on a GPU" if on_gpu else "the rest left to decoding and encoding",
    )
    return threads
