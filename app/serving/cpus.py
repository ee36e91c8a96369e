"""How many CPUs this process may really use, how many of them the model's torch threads get, and how the process's
CPU runtime (OpenMP, malloc) is tuned before torch loads.

torch's default is the host's core count, whatever the process may use: under a container's CPU limit (a cgroup
quota) or a CPU affinity mask that oversubscribes the process, and OpenMP threads that wait on each other collapse
when one of their cores is taken by someone else (BENCHMARKS.md: the CPU-hog run of bench/host_path.py). So:
count the CPUs from the affinity mask and the cgroup quota, and keep some for decoding and encoding, which run
beside the model.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("mae.cpus")

# glibc mallopt parameters, and what mae-serve sets them to (`prepare_runtime`).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # blocks under this come from the heap and are reused (32 MiB: glibc's upper bound)
TRIM_THRESHOLD = 256 * 2**20  # free memory kept at a heap's top before any is given back to the system


def prepare_runtime() -> str:
    """Tune this process's CPU runtime; call before torch is imported (mae-serve's first step). Returns a line for
    the log. Child processes (HTTP workers, the model process) inherit the environment part.

    - OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE, unless the variable is set): libgomp's default lets
      each worker spin for milliseconds after every parallel region, and between the model's batches that spinning
      took a third of the server's CPU (perf: 33 % in libgomp, null model), from the cores decoding and encoding
      need. With the malloc change: the null model's CPU per image -41 % (BENCHMARKS.md); a served ViT-B
      -6 %, within this VM's noise (GOMP_SPINCOUNT gives the spinning back).
    - malloc keeps freed blocks under 32 MiB for reuse: glibc's default maps each batch-sized tensor (a few MiB)
      fresh from the kernel and unmaps it when freed, so every batch pays a page fault per 4 KiB of each tensor
      (converting one batch of 8 images to floats took 12 ms instead of 1.8).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    malloc = f"malloc reuses freed blocks under {MMAP_THRESHOLD >> 20} MiB" if keep_freed_memory() else "malloc untuned"
    return f"OpenMP idle threads: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; {malloc}"


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
    (Leaving one of 2 CPUs idle for decoding halved a ViT-B's throughput for a small gain on tiny models; with a
    busy loop on one of the 2 cores, 2 threads still keep most of their quiet throughput: BENCHMARKS.md.)"""
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
