"""The engine: CPU batch caps, a lone request never waits, one model thread (or model instances side by side), and one
request's images in one batch whatever order their decodes finish in."""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
import pytest
import torch

from app.serving import model_thread
from app.serving.engine import LocalEngine
from app.serving.registry import ModelEntry
from model import MAE, get_config

pytestmark = pytest.mark.unit


def _engine(cap: int, max_wait_ms: float, forward: model_thread.Forward) -> tuple[LocalEngine, ModelEntry]:
    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    entry = ModelEntry("t", model, "-", "random", "none", torch.device("cpu"), torch.float32)
    engine = LocalEngine(forward, max_batch_size=32, max_wait_ms=max_wait_ms, max_queue=64, cpu_max_batch_size=cap)
    return engine, entry


def test_cpu_batches_stop_at_the_cpu_cap_and_a_lone_request_does_not_wait():
    sizes: list[int] = []

    def spy(e, op, images, masking):
        sizes.append(int(images.shape[0]))
        return model_thread.forward(e, op, images, masking)

    async def scenario() -> None:
        engine, entry = _engine(cap=3, max_wait_ms=600_000, forward=spy)
        engine.start()
        x = np.zeros((32, 32, 3), np.uint8)
        # Nothing else is on its way: answered at once, not after max_wait (ten minutes; the timeout would end it)
        await asyncio.wait_for(engine.submit(entry, "embed", x, None), timeout=60)
        await asyncio.gather(*(engine.submit(entry, "embed", x, None) for _ in range(7)))
        await engine.close(1)

    asyncio.run(scenario())
    assert sizes[0] == 1 and max(sizes) <= 3 and sum(sizes[1:]) == 7


def test_engine_runs_on_the_one_model_thread():
    import threading

    names: set[str] = set()

    def spy(e, op, images, masking):
        names.add(threading.current_thread().name)
        return model_thread.forward(e, op, images, masking)

    async def scenario() -> None:
        engine, entry = _engine(cap=4, max_wait_ms=0, forward=spy)
        engine.start()
        await engine.submit(entry, "embed", np.zeros((32, 32, 3), np.uint8), None)
        model_thread.run(model_thread.compute, spy, entry, "embed", torch.zeros(1, 32, 32, 3, dtype=torch.uint8), None)
        await engine.close(1)

    asyncio.run(scenario())
    assert len(names) == 1 and next(iter(names)).startswith("mae-model")


class _LoopSteps(concurrent.futures.Executor):
    """An I/O pool that runs each job at once but answers it `steps[data]` event-loop steps later: every order of
    decodes finishing against the batcher's wake-ups, deterministically."""

    def __init__(self, loop: asyncio.AbstractEventLoop, steps: dict[bytes, int]) -> None:
        self.loop, self.steps = loop, steps

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        done: concurrent.futures.Future = concurrent.futures.Future()
        result = fn(*args, **kwargs)

        def later(n: int) -> None:
            if n:
                self.loop.call_soon(later, n - 1)
            else:
                done.set_result(result)

        later(self.steps[args[0]])
        return done


@pytest.mark.parametrize("steps", range(12))
def test_images_of_one_request_make_one_batch_whichever_is_decoded_last(steps):
    """Failed before the fix for some `steps` (batches [3, 1]): the last image's `coming` ended, waking the batcher,
    before its submission was queued, so the partial batch of 3 left without it (CI: the OOM-split test, under load)."""
    from types import SimpleNamespace

    from app.serving import pipeline
    from app.settings import Settings
    from tests.serving import image_bytes

    sizes: list[int] = []

    def spy(e, op, images, masking):
        sizes.append(int(images.shape[0]))
        return model_thread.forward(e, op, images, masking)

    pngs = [image_bytes(40 + i, 32) for i in range(4)]  # four real images, each its own decode

    async def scenario() -> None:
        engine, entry = _engine(cap=8, max_wait_ms=1000, forward=spy)
        engine.start()
        pool = _LoopSteps(asyncio.get_running_loop(), dict(zip(pngs, (0, 0, 1, 1 + steps), strict=True)))
        service = SimpleNamespace(settings=Settings(), engine=engine, io_pool=pool)
        mask = pipeline.MaskSpec(ratio=0.0, seed=0)
        await pipeline.each_image(
            pipeline.embed(service, entry, b, mask, "squash", None)  # type: ignore[arg-type]
            for b in pngs
        )
        await engine.close(1)

    asyncio.run(scenario())
    assert sizes == [4]


def test_instances_compute_batches_side_by_side_each_with_its_share_of_threads():
    """MAE_MODEL_INSTANCES=2: two batches compute at once, on two model threads of one torch thread each; with one
    instance they never overlap."""
    import threading
    import time

    def run(instances: int) -> tuple[int, set[str], set[int]]:
        lock, now, most = threading.Lock(), [0], [0]
        names: set[str] = set()
        threads: set[int] = set()

        def spy(e, op, images, masking):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
                names.add(threading.current_thread().name)
                threads.add(torch.get_num_threads())
            time.sleep(0.05)  # long enough for the other instance to start its batch
            with lock:
                now[0] -= 1
            return model_thread.forward(e, op, images, masking)

        async def scenario() -> None:
            engine, entry = _engine(cap=2, max_wait_ms=0, forward=spy)
            engine.instances = instances
            engine.start()
            x = np.zeros((32, 32, 3), np.uint8)
            await asyncio.gather(*(engine.submit(entry, "embed", x, None) for _ in range(8)))
            await engine.close(1)

        base = model_thread.run(torch.get_num_threads)
        model_thread.use_instances(instances, 1 if instances > 1 else base)
        try:
            asyncio.run(scenario())
        finally:
            model_thread.use_instances(1, base)
        return most[0], names, threads

    most, names, threads = run(2)
    assert most == 2 and len(names) == 2 and threads == {1}
    most, names, _ = run(1)
    assert most == 1 and len(names) == 1


def test_model_instances_setting_wins_and_a_gpu_or_one_thread_gets_one(tmp_path, monkeypatch):
    from app.serving import instances
    from app.settings import Settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, entry = _engine(cap=2, max_wait_ms=0, forward=model_thread.forward)
    assert instances.choose(Settings(model_instances=3), entry, model_thread.forward, 2, 2)[0] == 3
    assert instances.choose(Settings(), entry, model_thread.forward, 2, 1) == (1, "one torch thread")
    gpu = ModelEntry("g", entry.model, "-", "random", "none", torch.device("meta"), torch.float32)
    assert instances.choose(Settings(), gpu, model_thread.forward, 2, 2) == (1, "the model is on a GPU")
    assert not list(tmp_path.rglob("instances-*.json"))  # nothing timed, nothing cached


def test_model_instances_auto_times_both_and_caches_the_choice(tmp_path, monkeypatch):
    """auto on a CPU times 1 x 2 threads against 2 x 1 with decoding beside it, keeps the choice, and reads a planted
    one back instead of timing again."""
    import json

    from app.serving import instances
    from app.settings import Settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(instances, "TIMED_S", 0.2)
    _, entry = _engine(cap=2, max_wait_ms=0, forward=model_thread.forward)
    n, why = instances.choose(Settings(), entry, model_thread.forward, 2, 2)
    assert n in (1, 2) and "images/s" in why
    (cache,) = tmp_path.rglob("instances-*.json")
    assert json.loads(cache.read_text())["instances"] == n
    cache.write_text(json.dumps({"instances": 3 - n, "why": "planted"}))
    assert instances.choose(Settings(), entry, model_thread.forward, 2, 2) == (3 - n, "planted (cached)")
