"""How many batches the model computes side by side (MAE_MODEL_INSTANCES): the setting, or a timing at start.

On a GPU one: the device runs one batch at a time anyway. On a CPU the candidates are one instance with every torch
thread, and one instance per torch thread (each single-threaded: no OpenMP team, so none waits at a barrier for a
thread whose core went to decoding an image; model_thread explains the rest). Which serves more depends on the CPU,
the model and its precision, so `auto` times both on the loaded model, the way a loaded server runs it: each
instance computing batches of the CPU batch cap while the I/O pool decodes and resizes the next batch's images (a
photo-sized JPEG made here). Each candidate runs twice, in turn, and keeps its best; one instance per thread is
chosen only where it serves INSTANCES_MARGIN more images per second, as one instance answers a lone request sooner.
The choice is cached per CPU, torch, model and setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.serving import imaging, model_thread
from app.serving.cpus import cpu_features
from app.serving.model_thread import Forward
from app.serving.registry import ModelEntry
from app.settings import Settings
from model.masking import RECONSTRUCT_MASK_RATIO, random_masking_spec

log = logging.getLogger("mae.instances")

INSTANCES_MARGIN = 1.05  # one instance per thread doubles a lone request's time: keep it only for a clear gain
TIMED_S = 1.5  # per candidate and round, after one untimed batch per instance

# What /v1/models reports under runtime.model_instances (this process's choice; set by `choose`).
REPORT: dict[str, Any] = {}


def choose(settings: Settings, entry: ModelEntry, forward: Forward, batch: int, threads: int) -> tuple[int, str]:
    """(instances, why): MAE_MODEL_INSTANCES when set, else 1 on a GPU or with one torch thread, else timed."""
    if settings.model_instances:
        return settings.model_instances, f"MAE_MODEL_INSTANCES={settings.model_instances}"
    if entry.device.type != "cpu":
        return 1, "the model is on a GPU"
    if threads < 2:
        return 1, "one torch thread"
    key = [cpu_features(), torch.__version__, entry.sha256, str(entry.dtype), threads, batch, settings.cpu_kernels]
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "mae-serve" / f"instances-{digest}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        return int(cached["instances"]), cached["why"] + " (cached)"
    rates = time_candidates(settings, entry, forward, batch, threads)
    one, many = rates[1], rates[threads]
    n = threads if many > one * INSTANCES_MARGIN else 1
    why = f"timed here with decoding beside it: 1 x {threads} threads {one:.1f} images/s, {threads} x 1 {many:.1f}"
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"instances": n, "why": why}))
    return n, why


def time_candidates(
    settings: Settings, entry: ModelEntry, forward: Forward, batch: int, threads: int
) -> dict[int, float]:
    """Images per second with 1 instance of `threads` threads and `threads` instances of one, decoding beside."""
    photo = synthetic_photo()
    rates: dict[int, list[float]] = {1: [], threads: []}
    with ThreadPoolExecutor(settings.io_threads, thread_name_prefix="mae-calibrate-io") as io_pool:
        for _ in range(2):
            for n in rates:
                rates[n].append(_served_rate(settings, entry, forward, io_pool, photo, n, threads // n, batch))
    return {n: max(r) for n, r in rates.items()}


def _served_rate(
    settings: Settings,
    entry: ModelEntry,
    forward: Forward,
    io_pool: ThreadPoolExecutor,
    photo: bytes,
    instances: int,
    threads_each: int,
    batch: int,
) -> float:
    """`instances` fresh threads (their OpenMP teams end with them), each decoding its next batch in the I/O pool
    while computing this one, for TIMED_S after an untimed batch; images computed per second."""
    c = entry.config
    op: model_thread.Op = "reconstruct" if c.has_decoder else "embed"
    masking = random_masking_spec(c.num_patches, RECONSTRUCT_MASK_RATIO, 0, batch) if c.has_decoder else None
    max_pixels = settings.max_image_pixels
    done = [0] * instances
    start = threading.Barrier(instances + 1)
    stop = threading.Event()

    def decode_batch() -> list[Any]:
        return [io_pool.submit(imaging.load, photo, c.img_size, "squash", max_pixels) for _ in range(batch)]

    def instance(i: int) -> None:
        torch.set_num_threads(threads_each)
        model_thread.compute(forward, entry, op, [f.result() for f in decode_batch()], masking)  # untimed
        start.wait()
        upcoming = decode_batch()
        while not stop.is_set():
            images = [f.result() for f in upcoming]
            upcoming = decode_batch()
            model_thread.compute(forward, entry, op, images, masking)
            done[i] += batch
        for f in upcoming:
            f.result()

    workers = [threading.Thread(target=instance, args=(i,), name="mae-calibrate") for i in range(instances)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(TIMED_S)
    stop.set()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - t0)


def synthetic_photo(width: int = 1024, height: int = 683) -> bytes:
    """A photo-sized JPEG (smooth gradients and fine noise, quality 90) to decode while the model is timed."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()
