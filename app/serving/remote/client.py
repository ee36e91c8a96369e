"""A worker's side of app.serving.remote: RemoteEngine, the worker's stand-in for app.serving.engine.LocalEngine (the
same `submit`), one DEALER socket to the model process; its hello's answer, the catalog, becomes the worker's
Registry of stand-in models (stand_in.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio

from app.serving.engine import Submitting
from app.serving.errors import ComputeFailed, Overloaded
from app.serving.model_thread import Op, Result
from app.serving.registry import DTYPES, ModelEntry, Registry
from app.serving.remote.stand_in import RemoteConfig, RemoteModel
from app.serving.remote.wire import ERRORS, unpack, work
from model.masking import Masking


class RemoteEngine(Submitting):
    """The worker's engine: the same `submit` as app.serving.engine.LocalEngine, answered by the model process."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.pending: dict[int, asyncio.Future[Result]] = {}
        self.caps: dict[str, int] = {}
        self._ids = itertools.count()
        self._catalog: asyncio.Future[dict[str, Any]] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, timeout: float) -> Registry:
        """Hello -> the catalog (the model process answers once its models are loaded): the worker's Registry."""
        loop = asyncio.get_running_loop()
        self._catalog = loop.create_future()
        self._reader = loop.create_task(self._read(), name="mae-remote-engine")
        end = loop.time() + timeout
        while True:
            await self.sock.send_multipart([b"hello", b"{}"])
            try:
                catalog = await asyncio.wait_for(asyncio.shield(self._catalog), min(1.0, max(0.01, end - loop.time())))
                break
            except TimeoutError:
                if loop.time() >= end:
                    raise RuntimeError("the model process did not answer") from None
        entries = {}
        for m in catalog["models"]:
            model = RemoteModel(RemoteConfig(**m["config"]), m["family"], m["parameters"])
            entries[m["name"]] = ModelEntry(
                m["name"], model, m["path"], m["format"], m["sha256"], torch.device(m["device"]), DTYPES[m["dtype"]],
                m["random_init"],
            )  # fmt: skip
            self.caps[m["name"]] = int(m["cap"])
        registry = Registry(entries)
        registry.default = catalog["default"]
        return registry

    async def _read(self) -> None:
        while True:
            kind, head, *frames = await self.sock.recv_multipart(copy=False)
            h = json.loads(head.bytes)
            k = kind.bytes
            if k == b"catalog":
                if self._catalog is not None and not self._catalog.done():
                    self._catalog.set_result(h)
                continue
            fut = self.pending.pop(int(h["id"]), None)
            if fut is None or fut.done():
                continue
            if k == b"ok":
                fut.set_result(unpack(h, frames))
            else:
                fut.set_exception(ERRORS.get(h["kind"], ComputeFailed)(h["message"]))

    def submit(
        self, entry: ModelEntry, op: Op, image: np.ndarray, masking: Masking | None, deadline: float | None = None
    ) -> asyncio.Future[Result]:
        return asyncio.ensure_future(self._submit(entry, op, image, masking, deadline))

    async def _submit(
        self, entry: ModelEntry, op: Op, image: np.ndarray, masking: Masking | None, deadline: float | None
    ) -> Result:
        i = next(self._ids)
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.sock.send_multipart(work(i, entry.name, op, image, masking, deadline))
        try:
            return await fut
        except asyncio.CancelledError as e:
            self.pending.pop(i, None)
            reason = str(e.args[0]) if e.args else "client_closed"
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart([b"cancel", json.dumps({"id": i, "reason": reason}).encode()])
            raise

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Nothing to say: the model process cannot wait for another process's decodes (app.serving.remote)."""
        yield

    def cap(self, entry: ModelEntry) -> int:
        return self.caps[entry.name]

    async def close(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(Overloaded("the server shut down before this request ran"))
        self.sock.close(linger=0)
        self.ctx.term()
