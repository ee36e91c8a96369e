"""The engine across processes (MAE_WORKERS > 1): one model process, N HTTP worker processes, over ZeroMQ.

Every worker decodes and encodes in its own interpreter (its own GIL); all of them send their images to the one
model process, whose LocalEngine batches them together (batching stays global) and runs the model. A ZeroMQ ROUTER
socket (ipc://) in the model process (`EngineServer`) talks to a DEALER socket in each worker (`RemoteEngine`, the
worker's stand-in for app.serving.engine.LocalEngine: the same `submit`).

Messages are ZeroMQ multipart: a kind, a JSON header, raw array frames (never pickles).

    worker -> model    hello                                   -> catalog {models: [...], default}
                       work  {id, model, op, shape, len_keep, deadline}  image (uint8 H*W*3)  noise (float32 L | empty)
                       cancel {id, reason}
    model -> worker    ok    {id, ...}  arrays                 (one result: an Embedding or a Reconstruction)
                       error {id, kind, message}               (overloaded | deadline | failed)

Not carried across: the engine's wait for images still being decoded (`coming`): the model process cannot see the
workers' decodes, so a partial batch never waits for them; under load batches still fill while the model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio

from app.serving.engine import Engine
from app.serving.errors import ComputeFailed, DeadlineExceeded, Overloaded
from app.serving.model_thread import Op, Result
from app.serving.registry import DTYPES, ModelEntry, Registry
from model.family import PatchGrid
from model.masking import Masking
from model.outputs import Embedding, EncodeBatch, ReconstructBatch, Reconstruction

log = logging.getLogger("mae.remote")

_ERRORS: dict[str, type[Exception]] = {"overloaded": Overloaded, "deadline": DeadlineExceeded, "failed": ComputeFailed}


def _kind_of(e: BaseException) -> str:
    return "overloaded" if isinstance(e, Overloaded) else "deadline" if isinstance(e, DeadlineExceeded) else "failed"


# ---------------------------------------------------------------------------------------------- results on the wire
def pack(result: Result) -> tuple[dict[str, Any], list[bytes | np.ndarray]]:
    """A result -> (header, array frames)."""
    if isinstance(result, Embedding):
        head = {"type": "embedding", "grid": result.grid, "k": int(result.patches.shape[0]),
                "d": int(result.patches.shape[1]), "cls": result.cls is not None}  # fmt: skip
        cls = result.cls if result.cls is not None else b""
        return head, [cls, result.mean, result.patches, result.patch_indices]
    head = {"type": "reconstruction", "grid": result.grid, "patch_size": result.patch_size, "mse": result.mse,
            "l": int(result.pixels.shape[0]), "pd": int(result.pixels.shape[1])}  # fmt: skip
    return head, [result.pixels, result.mask, result.patch_error]


def unpack(head: dict[str, Any], frames: list[zmq.Frame]) -> Result:
    """(header, frames) -> the result, its arrays views of the received frames (no copy)."""

    def arr(frame: zmq.Frame, dtype: type[np.generic], *shape: int) -> np.ndarray:
        return np.frombuffer(frame.buffer, dtype=dtype).reshape(shape)

    grid = tuple(head["grid"])
    if head["type"] == "embedding":
        k, d = head["k"], head["d"]
        cls = arr(frames[0], np.float32, d) if head["cls"] else None
        return Embedding(cls, arr(frames[1], np.float32, d), arr(frames[2], np.float32, k, d),
                         arr(frames[3], np.int64, k), grid)  # fmt: skip
    length, pd = head["l"], head["pd"]
    return Reconstruction(arr(frames[0], np.uint8, length, pd), arr(frames[1], np.bool_, length),
                          arr(frames[2], np.float32, length), float(head["mse"]), grid,
                          int(head["patch_size"]))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the model process
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
            image = np.frombuffer(frames[0].buffer, dtype=np.uint8).reshape(h["shape"])
            masking = None
            if h["len_keep"] is not None:
                noise = torch.from_numpy(np.frombuffer(frames[1].buffer, dtype=np.float32).copy())[None]
                masking = Masking(noise, int(h["len_keep"]))
            result = await self.engine.submit(entry, h["op"], image, masking, h["deadline"])
        except asyncio.CancelledError:
            return  # the worker gave up on it: nobody to answer
        except Exception as e:
            err = {"id": h["id"], "kind": _kind_of(e), "message": str(e)}
            await self.sock.send_multipart([ident, b"error", json.dumps(err).encode()])
            return
        head, arrays = pack(result)
        head["id"] = h["id"]
        await self.sock.send_multipart([ident, b"ok", json.dumps(head).encode(), *arrays], copy=False)


# ---------------------------------------------------------------------------------------------- the workers
@dataclass(frozen=True)
class RemoteConfig(PatchGrid):
    """A model's shape as the worker knows it (model.family.ModelConfig), from the model process's catalog."""

    name: str
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    has_decoder: bool
    has_cls: bool
    decoder_embed_dim: int | None
    decoder_depth: int | None
    norm_pix_loss: bool

    @classmethod
    def of(cls, c: Any) -> RemoteConfig:
        return cls(**{f: getattr(c, f) for f in cls.__dataclass_fields__})


class RemoteModel:
    """A model that runs in the model process: here, only its description (its outputs come through the engine)."""

    def __init__(self, config: RemoteConfig, family: str, parameters: int) -> None:
        self._config, self._family, self._parameters = config, family, parameters

    @property
    def family(self) -> str:
        return self._family

    @property
    def config(self) -> RemoteConfig:
        return self._config

    def num_parameters(self) -> int:
        return self._parameters

    def encode(self, images: torch.Tensor, masking: Masking | None = None) -> EncodeBatch:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructBatch:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def modules(self) -> Iterator[torch.nn.Module]:
        return iter(())

    def eval(self) -> torch.nn.Module:
        raise RuntimeError("the model runs in the model process")


class RemoteEngine:
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
                fut.set_exception(_ERRORS.get(h["kind"], ComputeFailed)(h["message"]))

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
        noise = b"" if masking is None else masking.noise.numpy().astype(np.float32).tobytes()
        head = {"id": i, "model": entry.name, "op": op, "shape": list(image.shape),
                "len_keep": None if masking is None else masking.len_keep, "deadline": deadline}  # fmt: skip
        await self.sock.send_multipart([b"work", json.dumps(head).encode(), np.ascontiguousarray(image), noise])
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
        """Nothing to say: the model process cannot wait for another process's decodes (module docstring)."""
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
