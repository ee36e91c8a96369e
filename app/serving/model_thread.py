"""Where every batch runs: the process's model threads, and what each does with a batch.

Loading and warm-up run on the one model thread, and so does every batch unless the model runs as several
instances (`use_instances`: MAE_MODEL_INSTANCES, app.serving.instances); nowhere else runs torch ops big enough to
go parallel (image conversions are numpy). Why so few: PyTorch's OpenMP on Linux (libgomp) gives every thread that
starts a parallel region its own worker threads, and once the process holds more of those than CPUs, libgomp stops
letting idle workers spin: they sleep and are woken for each of the thousands of parallel regions of a forward pass,
which makes every forward pass in any thread but the first to go parallel measurably slower (BENCHMARKS.md). So N
instances share the torch threads: N threads with T / N OpenMP threads each, never more than T in all. One
instance per torch thread runs no parallel region at all: no team waits at a barrier for a thread whose core is
decoding an image.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numpy as np
import torch

from app.serving import metrics
from app.serving.registry import ModelEntry
from model.masking import Masking
from model.outputs import Embedding, Reconstruction

log = logging.getLogger("mae.model_thread")

Op = Literal["reconstruct", "embed"]
Result = Embedding | Reconstruction
# The seam between the batcher and the model: one batch of uint8 images (N, H, W, 3) on the CPU in, one result per
# image out. Tests pass a slow one.
Forward = Callable[[ModelEntry, Op, torch.Tensor, Masking | None], list[Result]]
T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_shape: tuple[int, int] | None = None  # (instances, torch threads each) once `use_instances` set it
_idents: set[int] = set()
_lock = threading.Lock()


class OutOfMemory(RuntimeError):
    """The model ran out of memory on a single image: nothing smaller to try."""


def _mark(threads: int | None = None) -> None:
    _idents.add(threading.get_ident())
    if threads is not None:
        torch.set_num_threads(threads)  # this thread's OpenMP team (libgomp keeps the count per thread)


def executor() -> ThreadPoolExecutor:
    """The model threads: one until `use_instances` says more (created on first use; they live as long as the
    process)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="mae-model", initializer=_mark)
        return _executor


def use_instances(n: int, threads_each: int) -> None:
    """From now on batches run on `n` model threads with `threads_each` torch threads each. The thread that loaded
    the model ends (and its OpenMP workers with it) once what it is running is done."""
    global _executor, _shape
    if _shape == (n, threads_each) or (_shape is None and n == 1 and run(torch.get_num_threads) == threads_each):
        _shape = (n, threads_each)  # already so: the loading thread goes on
        return
    waiting = not on_model_thread()
    with _lock:
        old = _executor
        _idents.clear()
        _executor = ThreadPoolExecutor(n, thread_name_prefix="mae-model", initializer=_mark, initargs=(threads_each,))
        _shape = (n, threads_each)
    if old is not None:
        old.shutdown(wait=waiting)


def on_model_thread() -> bool:
    return threading.get_ident() in _idents


def run(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` on the model thread and wait for it (loading, warm-up, benchmarks)."""
    if on_model_thread():
        return fn(*args)
    return executor().submit(fn, *args).result()


def to_input(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the CPU -> (N, 3, H, W) in [0, 1] on `device` in `dtype`: the bytes cross to the
    device (pinned, on CUDA), and become floats there, as x / 255 in float32 (the reference preprocessing)."""
    if device.type == "cuda":
        images = images.pin_memory()
    # Channels first while still uint8 (a quarter of the bytes to move), then one float tensor divided in place.
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return x.to(dtype)


def forward(entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Result]:
    """A batch of uint8 images (N, H, W, 3) on the CPU -> one result per image, on the CPU.

    One copy to the device and one back per tensor of what the answers need (model.outputs: unbatch)."""
    x = to_input(images, entry.device, entry.dtype)
    with torch.inference_mode():
        if op == "embed":
            return list(entry.model.encode(x, masking).unbatch())
        assert masking is not None, "a reconstruction needs a masking"
        return list(entry.model.reconstruct(x, masking).unbatch())


async def compute_batch(
    fwd: Forward, entry: ModelEntry, op: Op, images: list[np.ndarray], masking: Masking | None
) -> list[Result]:
    """`compute` on a model thread, awaited (the engine's one call per batch)."""
    return await asyncio.get_running_loop().run_in_executor(executor(), compute, fwd, entry, op, images, masking)


def compute(
    fwd: Forward, entry: ModelEntry, op: Op, images: list[np.ndarray] | torch.Tensor, masking: Masking | None
) -> list[Result]:
    """Run `fwd` on a batch of uint8 images (H, W, 3 each); on out-of-memory, split the batch in halves and retry
    (down to one image)."""
    # Stacking copies the batch (uint8, small): done here, off the event loop.
    batch = torch.from_numpy(np.stack(images)) if isinstance(images, list) else images
    try:
        return fwd(entry, op, batch, masking)
    except Exception as e:
        if not _is_oom(e):
            raise
        if entry.device.type == "cuda":
            torch.cuda.empty_cache()
        n = batch.shape[0]
        if n == 1:
            metrics.REJECTS.labels("out_of_memory").inc()
            raise OutOfMemory("the model ran out of memory on this request") from None
        log.warning("out of memory on a batch of %d; splitting", n)
        half = n // 2
        parts: list[Result] = []
        for sl in (slice(0, half), slice(half, n)):
            sub = Masking(masking.noise[sl], masking.len_keep) if masking is not None else None
            parts.extend(compute(fwd, entry, op, batch[sl], sub))
        return parts


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
