"""The service: everything a request needs, built once at start-up and handed to the routes by a dependency.

`Readiness` exists from the moment the app is created (the probes need it while the models load); `Service` exists
once the models are loaded and warm. Routes ask for the Service (`get_service`): until then they answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from fastapi import Request

from app import model_thread
from app.engine import Batcher, Engine
from app.errors import APIError
from app.middleware import InFlight
from app.model_thread import Forward
from app.registry import ModelEntry, ModelLoadError, Registry
from app.settings import Settings
from model.masking import Masking, len_keep_for_ratio, random_noise

log = logging.getLogger("mae.service")


@dataclass
class Service:
    settings: Settings
    registry: Registry
    engine: Batcher  # app.engine.Engine, or in an HTTP worker app.remote.RemoteEngine
    io_pool: ThreadPoolExecutor  # decoding and encoding: Pillow and zlib release the GIL

    def model(self, name: str | None, status: int = 422) -> ModelEntry:
        """The model a request names (the default when it names none); `status` for a name not loaded: 422 where a
        parameter names it (/v1), 404 where the path does (/v2)."""
        if name is not None and name not in self.registry:
            loaded = ", ".join(self.registry.entries)
            raise APIError(status, "unknown_model", f"unknown model {name!r}; loaded: {loaded}")
        return self.registry.get(name)


@dataclass
class Readiness:
    """The app's life: loading (service None) -> ready -> draining. `app.state.mae`."""

    settings: Settings
    inflight: InFlight
    service: Service | None = None
    draining: bool = False
    startup_error: str | None = None
    on_drain: list[Callable[[float], None]] = field(default_factory=list)  # other front-ends' graceful stops (gRPC)

    def service_or_503(self) -> Service:
        """The service, for work that needs the model (HTTP routes, gRPC calls): 503 while loading or draining."""
        if self.service is None or self.draining:
            raise APIError(503, "not_ready", "the model is still loading or the server is shutting down",
                           {"Retry-After": str(self.settings.retry_after_s)})  # fmt: skip
        return self.service

    @property
    def ready(self) -> bool:
        return self.service is not None and not self.draining

    def drain(self, budget_s: float) -> None:
        """At the shutdown signal, on the event loop: what is not answering `budget_s` from now gets 503, and every
        other front-end starts its own graceful stop with the same budget."""
        self.inflight.drain(budget_s)
        for hook in self.on_drain:
            hook(budget_s)


def get_readiness(request: Request) -> Readiness:
    return request.app.state.mae


async def readiness(request: Request) -> Readiness:
    """get_readiness as a dependency (async: FastAPI runs a plain function dependency in a worker thread, a hop per
    request for microseconds of work)."""
    return get_readiness(request)


async def get_service(request: Request) -> Service:
    """For routes that need the model: 503 until the models are loaded and warm, and while draining."""
    return get_readiness(request).service_or_503()


# ---------------------------------------------------------------------------------------------- start-up
async def start(settings: Settings, forward: Forward, io_pool: ThreadPoolExecutor) -> Service:
    """Load every model (on the model thread, like every batch), check the sha256 pins, warm up, start the engine."""
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    registry = await loop.run_in_executor(model_thread.executor(), Registry.from_settings, settings)
    check_pins(registry, settings.weight_pins())
    engine = Engine(
        forward,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        cpu_max_batch_size=settings.cpu_max_batch_size,
    )
    if settings.warmup:
        await loop.run_in_executor(model_thread.executor(), warm_up, forward, registry, settings.max_batch_size)
    engine.start()
    log.info("ready in %.2f s: %s", time.perf_counter() - t0, ", ".join(registry.entries))
    return Service(settings, registry, engine, io_pool)


async def start_remote(settings: Settings, address: str, io_pool: ThreadPoolExecutor) -> Service:
    """An HTTP worker's Service: the model process at `address` (app.remote) has the models and the engine."""
    from app.remote import RemoteEngine

    engine = RemoteEngine(address)
    registry = await engine.connect(timeout=3600.0)  # as long as the model process takes to load and warm up
    log.info("worker %d ready: models %s in the model process", os.getpid(), ", ".join(registry.entries))
    return Service(settings, registry, engine, io_pool)


def warm_up(forward: Forward, registry: Registry, max_batch: int) -> None:
    """Run every shape the server will run first: batch 1 and a small batch, embed and reconstruct."""
    for entry in registry.entries.values():
        c = entry.config
        n = c.num_patches
        for b in sorted({1, min(max_batch, 4)}):
            images = torch.randint(0, 256, (b, c.img_size, c.img_size, 3), dtype=torch.uint8)
            model_thread.compute(forward, entry, "embed", images, None)
            if c.has_decoder:
                masking = Masking(random_noise(b, n, seed=0), len_keep_for_ratio(n, 0.75))
                model_thread.compute(forward, entry, "reconstruct", images, masking)


def check_pins(registry: Registry, pins: dict[str | None, str]) -> None:
    """MAE_WEIGHTS_SHA256: a weights file whose sha256 differs from its pin (tampered, truncated, swapped) stops
    the start. The sha256 is the one the registry computed over the file it loaded."""
    if None in pins and len(registry.entries) > 1:
        raise ModelLoadError("MAE_WEIGHTS_SHA256 has an unnamed pin but several models are loaded: name=sha256,...")
    for name in pins.keys() - set(registry.entries) - {None}:
        raise ModelLoadError(f"MAE_WEIGHTS_SHA256 pins model {name!r}, which MAE_WEIGHTS does not load")
    for name, entry in registry.entries.items():
        want = pins.get(name) or pins.get(None)
        if want and entry.sha256 != want:
            raise ModelLoadError(
                f"model {name!r}: {entry.path} has sha256 {entry.sha256}, but MAE_WEIGHTS_SHA256 expects {want}"
            )
