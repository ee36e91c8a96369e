"""Where every batch runs: the process's one model thread, and what it does with a batch.

Loading, warm-up and every batch run on this thread, and nowhere else runs torch ops big enough to go parallel
(image conversions are numpy). Why one: PyTorch's OpenMP on Linux (libgomp) gives every thread that starts a
parallel region its own worker threads, and once the process holds more of those than CPUs, libgomp stops letting
idle workers spin: they sleep and are woken for each of the thousands of parallel regions of a forward pass, which
makes every forward pass in any thread but the first to go parallel measurably slower (BENCHMARKS.md).
"""

from __future__ import annotations

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
_ident: int | None = None
_lock = threading.Lock()


class OutOfMemory(RuntimeError):
    """The model ran out of memory on a single image: nothing smaller to try."""


def _mark() -> None:
    global _ident
    _ident = threading.get_ident()


def executor() -> ThreadPoolExecutor:
    """The one model thread (created on first use; it lives as long as the process)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="mae-model", initializer=_mark)
        return _executor


def on_model_thread() -> bool:
    return threading.get_ident() == _ident


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
