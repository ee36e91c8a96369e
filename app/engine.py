"""The dynamic batcher: requests wait in one bounded queue, a worker forms batches and runs the model.

Items batch together when they share (model, operation, visible-patch count, input size): one forward pass
then serves them all. The model runs in one dedicated thread per engine, so the event loop never blocks and
only this module touches the device. While a batch computes, new requests queue up and form the next batch,
so under load batches grow by themselves; `max_wait_ms` only decides how long a lone partial batch waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from app import metrics
from app.registry import ModelEntry, Registry
from model.masking import Masking

log = logging.getLogger("mae.engine")

Op = Literal["reconstruct", "embed"]


class EngineError(Exception):
    """Base for answers the engine gives instead of a result."""


class Overloaded(EngineError):
    pass


class DeadlineExceeded(EngineError):
    pass


class ComputeFailed(EngineError):
    pass


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


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Engine:
    def __init__(self, registry: Registry, *, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mae-model")
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0  # items taken from the queue and not yet answered

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

    def run_sync(self, entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Any]:
        """Run one batch directly on the model thread's code path (warm-up, benchmarks)."""
        return self._compute(entry, op, images, masking)

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
        self._executor.shutdown(wait=False, cancel_futures=True)

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
                images = torch.stack([it.image for it in batch])
                masking = Masking.cat([it.masking for it in batch]) if first.masking is not None else None
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._compute, first.entry, first.op, images, masking
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
        """Take the oldest item and every queued item with its key, up to max_batch_size.

        If that is fewer than max_batch_size, wait until max_wait after the oldest item arrived for more.
        Items past their deadline are answered 504 here, without being computed.
        """
        self._drop_expired()
        if not self._queue:
            return []
        key = self._queue[0].key
        wait_until = self._queue[0].enqueued + self.max_wait
        while self._count(key) < self.max_batch_size and time.monotonic() < wait_until:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, wait_until - time.monotonic()))
            except TimeoutError:
                break
        self._drop_expired()
        batch, rest = [], deque()
        while self._queue:
            it = self._queue.popleft()
            if it.key == key and len(batch) < self.max_batch_size and not it.future.done():
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
            if it.future.done():  # cancelled: the client went away
                continue
            if it.deadline is not None and now > it.deadline:
                metrics.REJECTS.labels("deadline").inc()
                it.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            keep.append(it)
        self._queue = keep

    # ------------------------------------------------------------------ model thread
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
                return [
                    {
                        "cls": None if out.cls is None else out.cls[i].float().cpu(),
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
