"""The model process's side of app.serving.remote: one ROUTER socket that answers every worker's hello with the
catalog of loaded models, and their work with this process's engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import zmq
import zmq.asyncio

from app.serving.engine import Engine
from app.serving.registry import Registry
from app.serving.remote.stand_in import RemoteConfig
from app.serving.remote.wire import kind_of, pack, read_work


class EngineServer:
    """The model process's side: answers the workers' hello with the catalog, and their work with the engine."""

    def __init__(self, address: str, registry: Registry, engine: Engine) -> None:
        self.address, self.registry, self.engine = address, registry, engine
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    def catalog(self) -> dict[str, Any]:
        return {
            "default": self.registry.default,
            "models": [
                {
                    "name": e.name,
                    "path": e.path,
                    "format": e.format,
                    "sha256": e.sha256,
                    "device": str(e.device),
                    "dtype": str(e.dtype).removeprefix("torch."),
                    "random_init": e.random_init,
                    "family": e.model.family,
                    "parameters": e.model.num_parameters(),
                    "cap": self.engine.cap(e),
                    "config": asdict(RemoteConfig.of(e.config)),
                }
                for e in self.registry.entries.values()
            ],
        }

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._serve(), name="mae-engine-server")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        for t in self.tasks.values():
            t.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    async def _serve(self) -> None:
        while True:
            ident, kind, head, *frames = await self.sock.recv_multipart(copy=False)
            h = json.loads(head.bytes)
            k = kind.bytes
            if k == b"work":
                key = (ident.bytes, int(h["id"]))
                self.tasks[key] = asyncio.get_running_loop().create_task(self._work(ident.bytes, h, frames))
                self.tasks[key].add_done_callback(self._forget(key))
            elif k == b"cancel":
                waiting = self.tasks.get((ident.bytes, int(h["id"])))
                if waiting is not None:
                    waiting.cancel(msg=h.get("reason", "client_closed"))  # the engine drops it before compute
            elif k == b"hello":
                await self.sock.send_multipart([ident.bytes, b"catalog", json.dumps(self.catalog()).encode()])

    def _forget(self, key: tuple[bytes, int]) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self.tasks.pop(key, None)

        return forget

    async def _work(self, ident: bytes, h: dict[str, Any], frames: list[zmq.Frame]) -> None:
        try:
            entry = self.registry.get(h["model"])
            image, masking = read_work(h, frames)
            result = await self.engine.submit(entry, h["op"], image, masking, h["deadline"])
        except asyncio.CancelledError:
            return  # the worker gave up on it: nobody to answer
        except Exception as e:
            err = {"id": h["id"], "kind": kind_of(e), "message": str(e)}
            await self.sock.send_multipart([ident, b"error", json.dumps(err).encode()])
            return
        head, arrays = pack(result)
        head["id"] = h["id"]
        await self.sock.send_multipart([ident, b"ok", json.dumps(head).encode(), *arrays], copy=False)
