"""MAE_WORKERS > 1: HTTP workers in front of one model process (app/supervisor.py, app/serving/remote/), for real.

Same answers as one process; batching stays global (images from every worker meet in one engine); shared metrics;
a client that leaves has its queued images dropped in the model process; a worker that dies is replaced; SIGTERM
drains every worker and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.harness import ServerProcess, free_port, metric_value
from tests.serving import image_bytes, post_image, server_process
from tests.test_vit_pytorch import make_reference, ref, save, sidecar  # noqa: F401

pytestmark = pytest.mark.integration

PNG = image_bytes(64, 48)


def server(weights, module: str = "app.cli", **env: str) -> ServerProcess:
    return server_process(weights, module=module, **{"MAE_CPU_KERNELS": "stock", "MAE_TORCH_THREADS": "1", **env})


def post(url: str, path: str, **params) -> httpx.Response:
    return post_image(url, path, PNG, **params)


def worker_pids(url: str, tries: int = 40) -> set[int]:
    """The pids that answer /readyz on fresh connections: the workers serving the port."""
    pids = set()
    for _ in range(tries):
        with httpx.Client() as c:  # a new connection each time: the kernel picks a worker
            r = c.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                pids.add(r.json()["pid"])
    return pids


def test_workers_answer_as_one_process_does(weights):
    calls = [
        ("/v1/reconstruct", {"seed": "3"}),
        ("/v1/reconstruct", {"seed": "3", "format": "json"}),
        ("/v1/embed", {"pool": "all"}),
        ("/v1/embed", {"mask_ratio": "0.5", "seed": "7", "format": "npz"}),
    ]
    answers = {}
    for workers in ("1", "2"):
        with server(weights, MAE_WORKERS=workers) as s:
            answers[workers] = [post(s.url, path, **params) for path, params in calls]
            if workers == "2":
                pids = worker_pids(s.url)
                models = httpx.get(s.url + "/v1/models").json()
                m = s.metrics()
    for one, two in zip(answers["1"], answers["2"], strict=True):
        assert one.status_code == two.status_code == 200
        assert one.content == two.content or one.json() == two.json()
    assert len(pids) == 2 and s.pid not in pids, pids  # two workers serve; the model process does not
    assert models["models"][0]["family"] == "mae" and models["models"][0]["max_batch_size"] >= 1
    assert metric_value(m, "mae_requests_total", route="/v1/reconstruct", status="200") == 2  # shared metrics
    assert metric_value(m, "mae_images_total", op="embed") == 2  # counted in the model process, seen by a worker


def test_a_worker_joining_a_serving_model_process_is_ready_before_it_accepts(make_settings, tmp_path):
    """A worker (re)started while the others serve must not take connections it can only answer 503."""
    from app.http.main import create_app
    from app.serving import model_thread, service
    from app.serving.remote import EngineServer

    settings = make_settings(device="cpu", warmup=False)
    address = f"ipc://{tmp_path}/engine"

    async def join() -> object:
        up = await service.start(settings, model_thread.forward, ThreadPoolExecutor(1))
        engine_server = EngineServer(address, up.registry, up.engine)
        engine_server.start()
        app = create_app(settings, engine_address=address)
        try:
            async with app.router.lifespan_context(app):  # uvicorn accepts connections once this has entered
                return app.state.readiness.service
        finally:
            await engine_server.close()
            await up.engine.close(0)

    assert asyncio.run(join()) is not None


def test_batching_stays_global_and_abandoned_work_is_dropped(weights):
    env = {"MAE_WORKERS": "2", "MAE_TEST_FORWARD_SLEEP_S": "1.0", "MAE_MAX_BATCH_SIZE": "8",
           "MAE_CPU_MAX_BATCH_SIZE": "8"}  # fmt: skip
    with server(weights, module="tests.launch", **env) as s:
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(post(s.url, "/v1/embed"))) for _ in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        m = s.metrics()
        sizes = metric_value(m, "mae_batch_size_sum", op="embed"), metric_value(m, "mae_batch_size_count", op="embed")
        # Abandoned: requests queued behind a slow batch, their clients gone. The first goes alone, so it is
        # computing (a lone request never waits) when the other five queue behind it.
        socks = []
        for n in (1, 5):
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", s.port))
                sock.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
                             + str(len(PNG)).encode() + b"\r\n\r\n" + PNG)  # fmt: skip
                socks.append(sock)
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while metric_value(s.metrics(), "mae_queue_depth") < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in socks:
            sock.close()
        time.sleep(3.0)
        m = s.metrics()
    assert [r.status_code for r in answers] == [200] * 9, [r.text for r in answers]
    assert sizes[0] == 9 and sizes[1] <= 3, sizes  # 9 images in at most 3 forward passes
    dropped = metric_value(m, "mae_cancelled_images_total", reason="client_closed")
    computed = metric_value(m, "mae_images_total", op="embed") - 9
    assert dropped >= 3 and computed + dropped == 6, (dropped, computed)
    assert metric_value(m, "mae_requests_total", route="/v1/embed", status="499") == 6


def test_workers_know_the_model_as_the_model_process_does_and_one_serves_grpc(ref, tmp_path):  # noqa: F811
    """A vit-pytorch MAE pooled by mean has no CLS token: the workers' /v1 and /v2 say so before any compute, as one
    process does. With MAE_GRPC_PORT one worker serves gRPC; the others do not fight it for the port."""
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    weights = save(tmp_path, make_reference(ref, "mean").state_dict(), sidecar("mean"))
    with server(weights, MAE_WORKERS="2", MAE_GRPC_PORT=str(free_port())) as s:
        grpc_port = s.env["MAE_GRPC_PORT"]
        before = worker_pids(s.url)
        no_cls = post(s.url, "/v1/embed", pool="cls")
        npy = post(s.url, "/v1/embed", pool="cls", format="npy")
        mean = post(s.url, "/v1/embed", pool="mean")
        name = httpx.get(s.url + "/v1/models").json()["models"][0]["name"]
        outputs = [o["name"] for o in httpx.get(f"{s.url}/v2/models/{name}").json()["outputs"]]
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        grpc_ready = client.is_server_ready() and client.is_model_ready(name)
        client.close()
        time.sleep(2.0)  # a worker that lost the port would have exited and been replaced by now
        after = worker_pids(s.url)
    assert grpc_ready
    assert len(before) == 2 and before == after, (before, after)
    assert no_cls.status_code == npy.status_code == 422 and no_cls.json()["error"]["code"] == "no_cls_token"
    assert mean.status_code == 200 and "cls" not in mean.json()
    assert "cls" not in outputs and "mean" in outputs, outputs


def test_a_dead_worker_is_replaced_and_sigterm_drains_all(weights):
    env = {"MAE_WORKERS": "2", "MAE_TEST_FORWARD_SLEEP_S": "0.5", "MAE_MAX_BATCH_SIZE": "1",
           "MAE_SHUTDOWN_TIMEOUT_S": "20"}  # fmt: skip
    with server(weights, module="tests.launch", **env) as s:
        victim = worker_pids(s.url).pop()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = worker_pids(s.url, tries=10)
            if victim not in now and len(now) == 2:
                break
            time.sleep(0.5)
        assert victim not in now and len(now) == 2, now
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(post(s.url, "/v1/embed").status_code))
                   for _ in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(0.4)
        t0 = time.monotonic()
        rc = s.stop(signal.SIGTERM, timeout=60)
        for t in threads:
            t.join(30)
    assert rc == 0, s.tail()
    assert answers == [200] * 4, answers  # all in flight at SIGTERM were answered
    assert time.monotonic() - t0 < 20
