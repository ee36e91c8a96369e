"""Overload through a real server: offered ~2x what the model can do, every request is answered (200, or 503 with
Retry-After), the queue never grows past MAE_MAX_QUEUE; a request whose X-MAE-Deadline-Ms passes while it waits gets
504 and is never computed. (Memory under sustained overload is measured by bench/soak.py, not asserted here.)

The model is made slow on purpose (a fixed sleep per forward pass), so capacity is known on any machine:
MAX_BATCH images per FORWARD_S seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.serving import metrics, model_thread
from tests.serving import assert_error, counter_value, image_bytes, live_server

pytestmark = pytest.mark.integration

FORWARD_S = 0.05
MAX_BATCH = 2
MAX_QUEUE = 4
CAPACITY = MAX_BATCH / FORWARD_S  # images per second: 40
PNG = image_bytes(16, 16)


class SlowModel:
    """A forward function (the engine's seam) whose every pass takes `delay` seconds longer; `computed` lists the
    batch sizes run, in order."""

    def __init__(self, delay: float) -> None:
        self.delay, self.computed = delay, []

    def forward(self, entry, op, images, masking):
        self.computed.append(int(images.shape[0]))
        time.sleep(self.delay)
        return model_thread.forward(entry, op, images, masking)


@pytest.fixture
def slow_model() -> SlowModel:
    return SlowModel(FORWARD_S)


def open_loop(url: str, rate: float, seconds: float) -> list[tuple]:
    """Send at a fixed rate whatever the answers (open loop); -> [(status, retry-after, error code) or (exc,)]."""

    def one(h: httpx.Client) -> tuple:
        try:
            r = h.post("/v1/embed", params={"pool": "cls"}, content=PNG, headers={"Content-Type": "image/png"})
        except httpx.HTTPError as e:  # a lost request: no answer at all
            return (repr(e),)
        code = r.json()["error"]["code"] if r.status_code >= 400 else None
        return (r.status_code, r.headers.get("retry-after"), code)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as h, ThreadPoolExecutor(48) as pool:
        start, futures = time.monotonic(), []
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            futures.append(pool.submit(one, h))
        return [f.result() for f in futures]


@pytest.mark.soak
def test_overload_every_request_answered_and_the_queue_bounded(make_settings, slow_model):
    s = make_settings(
        max_batch_size=MAX_BATCH, max_queue=MAX_QUEUE, max_wait_ms=1, warmup=False,
        retry_after_s=1, log_level="warning",
    )  # fmt: skip
    with live_server(s, forward=slow_model.forward) as (url, server):
        engine = server.config.app.state.readiness.service.engine
        depths: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                depths.append(engine.depth)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rejected_before = counter_value(metrics.REJECTS, "queue_full")
        results = []
        try:
            for _ in range(3):  # three rounds
                t = time.monotonic()
                results += open_loop(url, rate=2 * CAPACITY, seconds=2.0)
                rounds_s = time.monotonic() - t
                gauge = [
                    ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith("mae_queue_depth ")
                ]
                assert float(gauge[0].split()[1]) <= MAX_QUEUE
        finally:
            stop.set()
            watcher.join()
        statuses = Counter(r[0] for r in results)
        lost = [r for r in results if len(r) == 1]
        print(
            f"\noverload: {len(results)} requests at {2 * CAPACITY:.0f}/s vs capacity {CAPACITY:.0f}/s "
            f"(last round {rounds_s:.1f} s): {dict(statuses)}, lost {len(lost)}, max queue depth {max(depths)} "
            f"(cap {MAX_QUEUE}), batches {Counter(slow_model.computed)}"
        )
        assert not lost, lost[:3]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] > 0 and statuses[200] >= 0.25 * CAPACITY * 6, statuses  # overloaded, still serving
        assert all(r[1] == "1" and r[2] == "overloaded" for r in results if r[0] == 503)
        assert counter_value(metrics.REJECTS, "queue_full") - rejected_before == statuses[503]
        assert max(depths) <= MAX_QUEUE
        assert engine.depth == 0 and engine.in_flight == 0
        assert httpx.get(url + "/readyz").status_code == 200


def test_deadline_passed_in_the_queue_is_504_and_never_computed(make_settings, slow_model):
    slow_model.delay = 0.4  # the first request holds the model for 0.4 s
    s = make_settings(max_batch_size=1, max_wait_ms=0, warmup=False, log_level="warning")
    with (
        live_server(s, forward=slow_model.forward) as (url, _),
        httpx.Client(base_url=url, timeout=30) as h,
        ThreadPoolExecutor(4) as pool,
    ):
        images_before = counter_value(metrics.IMAGES, "embed")
        deadline_before = counter_value(metrics.REJECTS, "deadline")

        def post(deadline_ms: str | None) -> tuple[httpx.Response, float]:
            t = time.monotonic()
            headers = {"Content-Type": "image/png"}
            if deadline_ms is not None:
                headers["X-MAE-Deadline-Ms"] = deadline_ms
            return h.post("/v1/embed", content=PNG, headers=headers), time.monotonic() - t

        busy = pool.submit(post, None)
        while not slow_model.computed:  # the first request is on the model now
            time.sleep(0.005)
        late = pool.submit(post, "100")  # waits behind it, past its 100 ms
        patient = pool.submit(post, "10000")
        (r_busy, _), (r_late, t_late), (r_patient, _) = busy.result(), late.result(), patient.result()
        assert r_busy.status_code == 200 and r_patient.status_code == 200
        assert_error(r_late, 504, "deadline_exceeded")
        assert t_late < 2.0
        assert slow_model.computed == [1, 1]  # busy and patient; the late one never reached the model
        assert counter_value(metrics.IMAGES, "embed") - images_before == 2
        assert counter_value(metrics.REJECTS, "deadline") - deadline_before == 1
