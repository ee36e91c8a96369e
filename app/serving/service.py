"""The Service: everything a request needs (settings, the loaded models, the engine, the I/O pool), and its start:
load every model, check the pins, warm up, start the engine. Front-ends get it from app.http.readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.serving import instances, jpeg_gpu, model_thread
from app.serving.engine import Engine, LocalEngine
from app.serving.errors import UnknownModel
from app.serving.model_thread import Forward
from app.serving.registry import ModelEntry, ModelLoadError, Registry
from app.settings import Settings
from model.masking import RECONSTRUCT_MASK_RATIO, Masking, len_keep_for_ratio, random_noise

log = logging.getLogger("mae.service")


@dataclass
class Service:
    settings: Settings
    registry: Registry
    engine: Engine  # engine.LocalEngine, or in an HTTP worker remote.RemoteEngine
    io_pool: ThreadPoolExecutor  # decoding and encoding: Pillow and zlib release the GIL

    def model(self, name: str | None) -> ModelEntry:
        """The model a request names (the default when it names none), or UnknownModel (/v1 answers 422, /v2 404:
        there the path names it)."""
        if name is not None and name not in self.registry:
            raise UnknownModel(f"unknown model {name!r}; loaded: {', '.join(self.registry.entries)}")
        return self.registry.get(name)


# ---------------------------------------------------------------------------------------------- start-up
async def start(settings: Settings, forward: Forward, io_pool: ThreadPoolExecutor) -> Service:
    """Load every model (on the model thread, like every batch), check the sha256 pins, warm up, start the engine."""
    t0 = time.perf_counter()
    check_jpeg_decode(settings)
    loop = asyncio.get_running_loop()
    registry = await loop.run_in_executor(model_thread.executor(), Registry.from_settings, settings)
    check_pins(registry, settings.weight_pins())
    engine = LocalEngine(
        forward,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        cpu_max_batch_size=settings.cpu_max_batch_size,
    )
    if settings.warmup:
        try:
            await loop.run_in_executor(model_thread.executor(), warm_up, forward, registry, settings.max_batch_size)
        except Exception as e:
            raise ModelLoadError(warm_up_failure(e, settings, registry)) from e
    entry = registry.get(None)
    engine.instances = await loop.run_in_executor(None, start_instances, settings, entry, forward, engine.cap(entry))
    engine.start()
    log.info("ready in %.2f s: %s", time.perf_counter() - t0, ", ".join(registry.entries))
    return Service(settings, registry, engine, io_pool)


async def start_remote(settings: Settings, address: str, io_pool: ThreadPoolExecutor) -> Service:
    """An HTTP worker's Service: the model process at `address` (app.serving.remote) has the models and the engine."""
    from app.serving.remote import RemoteEngine

    check_jpeg_decode(settings)  # the workers decode
    engine = RemoteEngine(address)
    registry = await engine.connect(timeout=3600.0)  # as long as the model process takes to load and warm up
    log.info("worker %d ready: models %s in the model process", os.getpid(), ", ".join(registry.entries))
    return Service(settings, registry, engine, io_pool)


def start_instances(settings: Settings, entry: ModelEntry, forward: Forward, cap: int) -> int:
    """MAE_MODEL_INSTANCES chosen (app.serving.instances: timed on `entry`, the default model, at its batch `cap`
    where `auto`, and only after a warm-up: MAE_WARMUP=0 starts one) and the model threads made to match; returns
    how many."""
    threads = model_thread.run(torch.get_num_threads)
    if settings.model_instances or settings.warmup:
        n, why = instances.choose(settings, entry, forward, cap, threads)
    else:
        n, why = 1, "not timed: MAE_WARMUP=0"
    each = max(1, threads // n) if entry.device.type == "cpu" else threads
    model_thread.use_instances(n, each)
    instances.REPORT.update(instances=n, threads_each=each, chosen_by=why)
    log.info("model instances: %d x %d torch threads (%s)", n, each, why)
    return n


def warm_up(forward: Forward, registry: Registry, max_batch: int) -> None:
    """Run every shape the server will run first: batch 1 and a small batch, embed and reconstruct."""
    for entry in registry.entries.values():
        c = entry.config
        n = c.num_patches
        for b in sorted({1, min(max_batch, 4)}):
            images = torch.randint(0, 256, (b, c.img_size, c.img_size, 3), dtype=torch.uint8)
            model_thread.compute(forward, entry, "embed", images, None)
            if c.has_decoder:
                masking = Masking(random_noise(b, n, seed=0), len_keep_for_ratio(n, RECONSTRUCT_MASK_RATIO))
                model_thread.compute(forward, entry, "reconstruct", images, masking)


def warm_up_failure(e: Exception, settings: Settings, registry: Registry) -> str:
    """The one line a failed warm-up leaves: what failed, the settings in force, and which one to change."""
    first = (str(e).strip().splitlines() or [""])[0]
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    entry = next(iter(registry.entries.values()))
    where = f"{entry.device}/{str(entry.dtype).removeprefix('torch.')}"
    source = type(e).__module__
    if settings.compile != "off" and source.startswith(("torch._dynamo", "torch._inductor", "torch.fx")):
        fix = (
            f"torch.compile failed under MAE_COMPILE={settings.compile} with MAE_CPU_KERNELS={settings.cpu_kernels}: "
            "set MAE_COMPILE=off (or try MAE_CPU_KERNELS=stock)"
        )
    elif isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        fix = f"out of memory at batch {settings.max_batch_size}: lower MAE_MAX_BATCH_SIZE or set MAE_DTYPE=bfloat16"
    else:
        fix = (
            f"with MAE_DEVICE={settings.device}, MAE_DTYPE={settings.dtype}, MAE_COMPILE={settings.compile}, "
            f"MAE_CPU_KERNELS={settings.cpu_kernels}: try MAE_DEVICE=cpu, MAE_DTYPE=float32 or MAE_CPU_KERNELS=stock, "
            "or MAE_WARMUP=0 to see the error on the first request"
        )
    return f"warm-up failed on {where}: {what} ({fix})"


def check_jpeg_decode(settings: Settings) -> None:
    """MAE_JPEG_DECODE=cuda where it cannot work stops the start with one line, rather than every JPEG failing."""
    if settings.jpeg_decode == "cuda" and (why := jpeg_gpu.unavailable(settings.device)):
        raise ModelLoadError(why)


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
