"""How many CPUs this process may really use, and how many of them the model's torch threads get.

torch's default is the host's core count, whatever the process may use: under a container's CPU limit (a cgroup
quota) or a CPU affinity mask that oversubscribes the process, and OpenMP threads that wait on each other collapse
when one of their cores is taken by someone else (BENCHMARKS.md: the CPU-hog run of bench/host_path.py). So:
count the CPUs from the affinity mask and the cgroup quota, and keep some for decoding and encoding, which run
beside the model.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("mae.cpus")


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
