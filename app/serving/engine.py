"""The dynamic batcher: requests wait in one bounded queue, a worker forms batches and hands them to the model threads.

Items batch together when they share (model, operation, visible-patch count, input size): one forward pass then
serves them all. While every model instance computes (one, or MAE_MODEL_INSTANCES side by side), new requests queue
up and form the next batch, so under load batches grow by themselves; `max_wait_ms` only decides how long a lone
partial batch waits for images still being decoded. What a batch runs is the `forward` function the engine is given
(model_thread.forward; tests give a slow one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from app.serving import metrics, model_thread
from app.serving.errors import ComputeFailed, DeadlineExceeded, EngineError, Overloaded
from app.serving.model_thread import Forward, Op, OutOfMemory, Result
from app.serving.registry import ModelEntry
from model.masking import Masking

log = logging.getLogger("mae.engine")


class Engine(Protocol):
    """What the pipeline needs of an engine: this one, or app.serving.remote.RemoteEngine in an HTTP worker."""

    async def run(
        self, entry: ModelEntry, ops: tuple[Op, ...], prepared: Awaitable[Prepared], deadline: float | None
    ) -> tuple[np.ndarray, list[Result]]: ...
    def submit(
        self, entry: ModelEntry, op: Op, image: np.ndarray, masking: Masking | None, deadline: float | None = None
    ) -> asyncio.Future[Result]: ...
    def expecting(self) -> contextlib.AbstractContextManager[None]: ...
    def cap(self, entry: ModelEntry) -> int: ...
    async def close(self, timeout: float) -> None: ...


Prepared = tuple[np.ndarray, list[Masking | None]]  # an image as the model takes it, and each op's masking


class Submitting:
    """`run`, the pipeline's one call, written once over an engine's `expecting` and `submit`."""

    def submit(
        self, entry: ModelEntry, op: Op, image: np.ndarray, masking: Masking | None, deadline: float | None = None
    ) -> asyncio.Future[Result]:
        raise NotImplementedError

    def expecting(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    async def run(
        self, entry: ModelEntry, ops: tuple[Op, ...], prepared: Awaitable[Prepared], deadline: float | None
    ) -> tuple[np.ndarray, list[Result]]:
        """Wait for the image being `prepared` (decoding: meanwhile a partial batch waits for it), then one
        submission per op, side by side (they may share batches with others); the image and each op's result."""
        answers: list[asyncio.Future[Result]] = []
        try:
            # Entered before the caller's first await: the batcher cannot run between the decode starting and this.
            # Until the image is queued, a partial batch may wait for it: `submit` queues before it returns.
            with self.expecting():
                image, maskings = await prepared
                for op, m in zip(ops, maskings, strict=True):
                    answers.append(self.submit(entry, op, image, m, deadline))
            return image, list(await asyncio.gather(*answers))
        except BaseException:
            for a in answers:  # a second op was refused (queue full): the first would be computed for no one
                a.cancel(msg="refused")
            raise


def _cancel_reason(future: asyncio.Future[Result]) -> str:
    """Why a queued item's future was cancelled: the message app.http.middleware gave its request's cancel()."""
    try:
        future.result()
    except asyncio.CancelledError as e:
        return str(e.args[0]) if e.args else "cancelled"
    except BaseException:  # answered with an error already (a deadline)
        return "answered"
    return "answered"


@dataclass
class WorkItem:
    entry: ModelEntry
    op: Op
    image: np.ndarray  # (H, W, 3) uint8: the preprocessed image (app.serving.imaging.preprocess)
    masking: Masking | None  # one row; None = every patch (embeddings)
    future: asyncio.Future[Result]
    deadline: float | None = None  # time.monotonic() after which the answer is no longer wanted
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, Op, int, tuple[int, ...]]:
        keep = self.masking.len_keep if self.masking is not None else -1
        return (self.entry.name, self.op, keep, tuple(self.image.shape))


class LocalEngine(Submitting):
    def __init__(
        self,
        forward: Forward = model_thread.forward,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        cpu_max_batch_size: int | None = None,
        instances: int = 1,
    ) -> None:
        self.forward = forward
        self.instances = instances  # batches computing at once (model_thread.use_instances: as many model threads)
        self.max_batch_size = max_batch_size
        self.cpu_max_batch_size = cpu_max_batch_size or max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._computing: set[asyncio.Task] = set()
        self._free: asyncio.Semaphore | None = None  # an instance free to compute a batch
        self._closing = False
        self.in_flight = 0  # items taken from the queue and not yet answered
        self._coming = 0  # images being decoded for this engine: a partial batch waits for these only

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._free = asyncio.Semaphore(self.instances)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="mae-engine")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(
        self,
        entry: ModelEntry,
        op: Op,
        image: np.ndarray,
        masking: Masking | None,
        deadline: float | None = None,
    ) -> asyncio.Future[Result]:
        """Queue one image now; the future is the model's per-image output. Raises Overloaded when the queue is full.

        Queued before this returns, so a caller inside `coming` has its image in the queue before it stops counting
        as on its way (an `async def` would queue only when its task first ran: the batcher could go in between).
        """
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
        return item.future

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Wrap the work before `submit` and the `submit` itself (decoding, then queueing): while any image is in
        there, a partial batch waits for it."""
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
        for task in self._computing:
            task.cancel()
        # The model thread is the process's (model_thread), not this engine's: it stays for a next app (tests).

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        """Take a free instance, then the next batch (what queued while every instance was busy forms it), and
        compute it beside the others."""
        assert self._free is not None
        while True:
            await self._free.acquire()
            try:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                batch = await self._form_batch()
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._compute(batch))
            self._computing.add(task)
            task.add_done_callback(self._computing.discard)

    async def _compute(self, batch: list[WorkItem]) -> None:
        assert self._free is not None
        self.in_flight += len(batch)
        try:
            start = time.monotonic()
            for it in batch:
                metrics.QUEUE_WAIT.observe(start - it.enqueued)
            first = batch[0]
            # One key, one len_keep: the batch's noise is its items' rows.
            masking = (
                Masking(torch.cat([it.masking.noise for it in batch if it.masking]), first.masking.len_keep)
                if first.masking
                else None
            )
            try:
                results = await model_thread.compute_batch(
                    self.forward, first.entry, first.op, [it.image for it in batch], masking
                )
            except Exception as e:  # answer every item; the engine itself keeps running
                err: EngineError
                if isinstance(e, OutOfMemory):  # expected (out of memory even at batch 1): no traceback
                    log.warning("batch of %d refused: %s", len(batch), e)
                    err = Overloaded(str(e))
                else:
                    log.exception("batch of %d failed", len(batch))
                    err = ComputeFailed(f"{type(e).__name__}: {e}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(err)
                return
            metrics.COMPUTE_TIME.labels(first.op).observe(time.monotonic() - start)
            metrics.BATCH_SIZE.labels(first.op).observe(len(batch))
            metrics.IMAGES.labels(first.op).inc(len(batch))
            for it, res in zip(batch, results, strict=True):
                if not it.future.done():  # the client may have gone away
                    it.future.set_result(res)
        finally:
            self.in_flight -= len(batch)
            self._free.release()

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
        batch: list[WorkItem] = []
        rest: deque[WorkItem] = deque()
        while self._queue:
            it = self._queue.popleft()
            if it.key == key and len(batch) < cap and not it.future.done():
                batch.append(it)
            elif not it.future.done():
                rest.append(it)
        self._queue = rest
        metrics.QUEUE_DEPTH.set(len(self._queue))
        return batch

    def _count(self, key: tuple[str, Op, int, tuple[int, ...]]) -> int:
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
