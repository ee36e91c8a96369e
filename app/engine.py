"""The dynamic batcher: requests wait in one bounded queue, a worker forms batches and runs the model.

Items batch together when they share (model, operation, visible-patch count, input size): one forward pass
then serves them all. The model runs in one dedicated thread per engine, so the event loop never blocks and
only this module touches the device. While a batch computes, new requests queue up and form the next batch,
so under load batches grow by themselves; `max_wait_ms` only decides how long a lone partial batch waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from app import metrics
from app.registry import ModelEntry, Registry
from model.masking import Masking

log = logging.getLogger("mae.engine")

Op = Literal["reconstruct", "embed"]
CpuKernels = Literal["auto", "onednn", "onednn-packed", "stock"]


# ---------------------------------------------------------------------------------------------- CPU kernels
class OneDNNLinear(nn.Linear):
    """An nn.Linear whose fp32 CPU inference runs oneDNN's matmul instead of PyTorch's default BLAS sgemm.

    Same parameters and state dict; results equal to fp32 rounding (~1e-6). Why: PyTorch's fp32 linear goes to MKL,
    whose sgemm takes its AVX2 path on AMD CPUs; oneDNN uses AVX-512 wherever the CPU has it. On the AMD EPYC of
    BENCHMARKS.md that is 2.3x the GEMM throughput and 2x a whole ViT-B forward. `_packed` (optional) holds the
    weight pre-reordered into oneDNN's blocked layout: ~5-9% faster again, for a second copy of the weights.
    """

    _packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            w = self._packed if self._packed is not None else self.weight
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return super().forward(x)


def onednn_linear_works() -> bool:
    """oneDNN's linear is in this build and agrees with stock PyTorch on a probe."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((2, 5, 48), (40, 48), (40,)))
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except Exception:  # any failure means: keep PyTorch's own kernels
        return False


def onednn_is_faster(layer: nn.Linear, tokens: int = 197, margin: float = 1.05) -> bool:
    """Time the model's widest linear layer on a ViT-sized input (best of 5, each kernel): oneDNN by `margin` or more?

    A few tens of milliseconds at start-up; it keeps PyTorch's kernels on CPUs where they are as fast (MKL on
    Intel AVX-512 parts can be), and picks oneDNN where they are not (AMD: 2x).
    """
    x = torch.randn(tokens, layer.in_features)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        stock = best(lambda: F.linear(x, layer.weight, layer.bias))
        onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], ""))
    log.info("linear %dx%d on %d tokens: stock %.2f ms, oneDNN %.2f ms", layer.in_features, layer.out_features,
             tokens, stock * 1e3, onednn * 1e3)  # fmt: skip
    return onednn * margin <= stock


def prepare_cpu_kernels(model: nn.Module, kernels: CpuKernels) -> int:
    """Switch the fp32 nn.Linear layers of a CPU model to OneDNNLinear in place; returns how many (0 = unchanged).

    auto: oneDNN if it works here and is faster on the model's widest linear layer (`onednn_is_faster`).
    """
    if kernels == "stock" or not onednn_linear_works():
        return 0
    layers = [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype is torch.float32 and m.weight.device.type == "cpu"
    ]  # fmt: skip
    if not layers:
        return 0
    if kernels == "auto" and not onednn_is_faster(max(layers, key=lambda m: m.weight.numel())):
        return 0
    for m in layers:
        m.__class__ = OneDNNLinear
        if kernels == "onednn-packed":
            # The batch-size hint only steers the layout choice; any batch size runs (and matches) afterwards.
            m._packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 256)
    return len(layers)


class EngineError(Exception):
    """Base for answers the engine gives instead of a result."""


class Overloaded(EngineError):
    pass


class DeadlineExceeded(EngineError):
    pass


class ComputeFailed(EngineError):
    pass


# ---------------------------------------------------------------------------------------------- the model thread
_model_thread: ThreadPoolExecutor | None = None
_model_thread_ident: int | None = None
_model_thread_lock = threading.Lock()


def _mark_model_thread() -> None:
    global _model_thread_ident
    _model_thread_ident = threading.get_ident()


def model_thread() -> ThreadPoolExecutor:
    """The process's one model thread: loading, warm-up and every batch run here, and nowhere else runs torch ops big
    enough to go parallel (image conversions are numpy, in app/imaging.py).

    Why one: PyTorch's OpenMP on Linux (libgomp) gives every thread that starts a parallel region its own worker
    threads, and once the process holds more of those than CPUs, libgomp stops letting idle workers spin: they
    sleep and are woken for each of the thousands of parallel regions of a forward pass. On 2 cores that made a
    ViT-B forward 16% slower, and the small demo model's 2x slower, in any thread but the first to go parallel.
    """
    global _model_thread
    with _model_thread_lock:
        if _model_thread is None:
            _model_thread = ThreadPoolExecutor(1, thread_name_prefix="mae-model", initializer=_mark_model_thread)
        return _model_thread


def on_model_thread() -> bool:
    return threading.get_ident() == _model_thread_ident


@dataclass
class WorkItem:
    entry: ModelEntry
    op: Op
    image: torch.Tensor  # (3, H, W) float32 in [0, 1], on the CPU
    masking: Masking | None  # one row; None = every patch (embeddings)
    future: asyncio.Future
    deadline: float | None = None  # time.monotonic() after which the answer is no longer wanted
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        keep = self.masking.len_keep if self.masking is not None else -1
        return (self.entry.name, self.op, keep, tuple(self.image.shape))


def _cancel_reason(future: asyncio.Future) -> str:
    """Why a queued item's future was cancelled: the message app.middleware gave its request's cancel()."""
    try:
        future.result()
    except asyncio.CancelledError as e:
        return str(e.args[0]) if e.args else "cancelled"
    except BaseException:  # answered with an error already (a deadline)
        return "answered"
    return "answered"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Engine:
    def __init__(
        self,
        registry: Registry,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        cpu_kernels: CpuKernels = "auto",
        cpu_max_batch_size: int | None = None,
    ) -> None:
        self.registry = registry
        self._executor = model_thread()
        self._executor.submit(self._prepare, registry, cpu_kernels).result()
        self.max_batch_size = max_batch_size
        self.cpu_max_batch_size = cpu_max_batch_size or max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0  # items taken from the queue and not yet answered
        self._coming = 0  # images being decoded for this engine: a partial batch waits for these only

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="mae-engine")

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(
        self,
        entry: ModelEntry,
        op: Op,
        image: torch.Tensor,
        masking: Masking | None,
        deadline: float | None = None,
    ) -> Any:
        """Queue one image; returns the model's per-image output. Raises Overloaded when the queue is full."""
        if self._closing:
            metrics.REJECTS.labels("draining").inc()
            raise Overloaded("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            metrics.REJECTS.labels("queue_full").inc()
            raise Overloaded(f"queue full ({self.max_queue} images waiting)")
        item = WorkItem(entry, op, image, masking, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(item)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        self._wakeup.set()
        return await item.future

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Wrap the work before `submit` (decoding): while any image is in there, a partial batch waits for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            if not self._coming:
                self._wakeup.set()  # nothing more is on its way: a waiting partial batch can go

    def cap(self, entry: ModelEntry) -> int:
        """The largest batch for a model: max_batch_size, and on a CPU at most cpu_max_batch_size."""
        if entry.device.type == "cpu":
            return min(self.max_batch_size, self.cpu_max_batch_size)
        return self.max_batch_size

    def run_sync(self, entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Any]:
        """Run one batch on the model thread, blocking until done (warm-up, benchmarks)."""
        if on_model_thread():
            return self._compute(entry, op, images, masking)
        return self._executor.submit(self._compute, entry, op, images, masking).result()

    async def close(self, timeout: float) -> None:
        """Stop taking work, let queued items finish for up to `timeout` seconds, then fail the rest."""
        self._closing = True
        end = time.monotonic() + timeout
        while (self._queue or self.in_flight) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Overloaded("the server shut down before this request ran"))
        self._queue.clear()
        if self._worker:
            self._worker.cancel()
        # The model thread is the process's (model_thread()), not this engine's: it stays for a next app (tests).

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._form_batch()
            if not batch:
                continue
            self.in_flight += len(batch)
            try:
                start = time.monotonic()
                for it in batch:
                    metrics.QUEUE_WAIT.observe(start - it.enqueued)
                first = batch[0]
                masking = Masking.cat([it.masking for it in batch]) if first.masking is not None else None
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._compute_items, first.entry, first.op, [it.image for it in batch], masking
                    )
                except Exception as e:  # answer every item; the engine itself keeps running
                    if isinstance(e, EngineError):  # expected (out of memory even at batch 1): no traceback
                        log.warning("batch of %d refused: %s", len(batch), e)
                    else:
                        log.exception("batch of %d failed", len(batch))
                    err = e if isinstance(e, EngineError) else ComputeFailed(f"{type(e).__name__}: {e}")
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(err)
                    continue
                metrics.COMPUTE_TIME.labels(first.op).observe(time.monotonic() - start)
                metrics.BATCH_SIZE.labels(first.op).observe(len(batch))
                metrics.IMAGES.labels(first.op).inc(len(batch))
                for it, res in zip(batch, results, strict=True):
                    if not it.future.done():  # the client may have gone away
                        it.future.set_result(res)
            finally:
                self.in_flight -= len(batch)

    async def _form_batch(self) -> list[WorkItem]:
        """Take the oldest item and every queued item with its key, up to the model's batch cap (`cap`).

        If that is fewer, and other images are being decoded (`coming`), wait for them until max_wait after the
        oldest item arrived: a lone request never waits. Items past their deadline are answered 504 here,
        without being computed.
        """
        self._drop_expired()
        if not self._queue:
            return []
        key = self._queue[0].key
        cap = self.cap(self._queue[0].entry)
        wait_until = self._queue[0].enqueued + self.max_wait
        while self._coming and self._count(key) < cap and time.monotonic() < wait_until:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, wait_until - time.monotonic()))
            except TimeoutError:
                break
        self._drop_expired()
        batch, rest = [], deque()
        while self._queue:
            it = self._queue.popleft()
            if it.key == key and len(batch) < cap and not it.future.done():
                batch.append(it)
            elif not it.future.done():
                rest.append(it)
        self._queue = rest
        metrics.QUEUE_DEPTH.set(len(self._queue))
        return batch

    def _count(self, key: tuple) -> int:
        return sum(1 for it in self._queue if it.key == key)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        keep: deque[WorkItem] = deque()
        for it in self._queue:
            if it.future.done():  # cancelled: the client went away, or the drain deadline passed
                metrics.CANCELLED.labels(_cancel_reason(it.future)).inc()
                continue
            if it.deadline is not None and now > it.deadline:
                metrics.REJECTS.labels("deadline").inc()
                it.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            keep.append(it)
        self._queue = keep
        metrics.QUEUE_DEPTH.set(len(keep))

    # ------------------------------------------------------------------ model thread
    @staticmethod
    def _prepare(registry: Registry, cpu_kernels: CpuKernels) -> None:
        for entry in registry.entries.values():
            if entry.device.type == "cpu" and entry.dtype == torch.float32:
                n = prepare_cpu_kernels(entry.model, cpu_kernels)
                used = ("onednn" if cpu_kernels == "auto" else cpu_kernels) if n else "stock"
                entry.info["cpu_kernels"] = used
                log.info("%s: fp32 linear layers on %s kernels (MAE_CPU_KERNELS=%s)", entry.name, used, cpu_kernels)

    def _compute_items(
        self, entry: ModelEntry, op: Op, images: list[torch.Tensor], masking: Masking | None
    ) -> list[Any]:
        # Stacking copies the whole batch: done here, so the event loop never runs a parallel torch op.
        return self._compute(entry, op, torch.stack(images), masking)

    def _compute(self, entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Any]:
        """Run the model on a batch; on out-of-memory, split the batch in halves and retry."""
        try:
            return self._forward(entry, op, images, masking)
        except Exception as e:
            if not _is_oom(e):
                raise
            if entry.device.type == "cuda":
                torch.cuda.empty_cache()
            n = images.shape[0]
            if n == 1:
                metrics.REJECTS.labels("out_of_memory").inc()
                raise Overloaded("the model ran out of memory on this request") from None
            log.warning("out of memory on a batch of %d; splitting", n)
            half = n // 2
            parts = []
            for sl in (slice(0, half), slice(half, n)):
                sub = Masking(masking.noise[sl], masking.len_keep) if masking is not None else None
                parts.extend(self._compute(entry, op, images[sl], sub))
            return parts

    @staticmethod
    def _forward(entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Any]:
        model = entry.model
        x = images.to(entry.device, entry.dtype, non_blocking=True)
        with torch.inference_mode():
            if op == "embed":
                out = model.encode(x, masking)
                mean = out.patches.mean(dim=1)
                return [
                    {
                        "cls": None if out.cls is None else out.cls[i].float().cpu(),
                        "mean": mean[i].float().cpu(),
                        "patches": out.patches[i].float().cpu(),
                        "patch_indices": out.patch_indices[i].cpu(),
                        "grid": out.grid,
                    }
                    for i in range(x.shape[0])
                ]
            out = model.reconstruct(x, masking)
            return [
                {
                    "reconstruction": out.reconstruction[i].float().cpu(),
                    "paste": out.paste[i].float().cpu(),
                    "masked": out.masked[i].float().cpu(),
                    "mask": out.mask[i].float().cpu(),
                    "patch_error": out.patch_error[i].float().cpu(),
                    "mse": float(out.mse[i]),
                    "grid": out.grid,
                }
                for i in range(x.shape[0])
            ]
