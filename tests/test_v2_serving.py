"""The v2 front-end inside the service: it shares the engine with /v1 (one forward pass serves both), sheds load
and drains on SIGTERM like HTTP, answers the service's limits in its own error shape, and is in /docs."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2 as pb

from app.http.main import create_app
from app.serving import model_thread
from app.v2.tensors import HEADER_LENGTH, join_bytes
from tests.harness import ServerProcess, free_port, metric_value
from tests.serving import image_bytes, live_server, server_process

pytestmark = pytest.mark.integration

PNG = image_bytes(48, 40)


def v2_body(*images: bytes, outputs: tuple[str, ...] = ("cls",), **parameters) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request body, built by hand (the wire format itself is under test here)."""
    raw = join_bytes(list(images))
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in outputs],
        "parameters": parameters,
    }  # fmt: skip
    head = json.dumps(header).encode()
    return head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def wait_for(url: str, text: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while text not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < end, f"{text} never showed in /metrics"
        time.sleep(0.01)


def test_a_v1_and_a_v2_request_share_one_forward_pass(make_settings):
    """While the model is busy, a /v1/embed and a /v2 infer (embedding outputs: the same engine key) queue up and
    the next forward pass serves both: batches of [1, 2], and each answer equals the one it gets alone."""
    batches: list[int] = []
    release = threading.Event()

    def forward(entry, op, images, masking):
        batches.append(images.shape[0])
        if len(batches) == 1:
            release.wait(20)  # the first batch holds the model until both requests are queued
        return model_thread.forward(entry, op, images, masking)

    s = make_settings(max_wait_ms=0, max_batch_size=8, warmup=False)
    with live_server(s, forward=forward) as (url, _):
        results: dict[str, httpx.Response] = {}

        def post(name: str, path: str, content: bytes, headers: dict[str, str]) -> None:
            results[name] = httpx.post(url + path, content=content, headers=headers, timeout=30)

        body, headers = v2_body(PNG)
        calls = [
            ("blocker", "/v1/embed", image_bytes(32, 32, seed=5), {"Content-Type": "image/png"}),
            ("v1", "/v1/embed?pool=cls", PNG, {"Content-Type": "image/png"}),
            ("v2", "/v2/models/tiny/infer", body, headers),
        ]
        threads = [threading.Thread(target=post, args=c) for c in calls]
        before = httpx.get(url + "/metrics").text  # in-process: the metrics hold this test session's other servers too
        threads[0].start()
        while not batches:
            time.sleep(0.01)
        for t in threads[1:]:
            t.start()
        wait_for(url, "mae_queue_depth 2.0")  # both wait behind the blocker, in one queue
        release.set()
        for t in threads:
            t.join(30)
        assert batches == [1, 2], batches
        assert {k: r.status_code for k, r in results.items()} == {"blocker": 200, "v1": 200, "v2": 200}
        after = httpx.get(url + "/metrics").text

        def delta(name: str) -> float:
            return metric_value(after, name, op="embed") - metric_value(before, name, op="embed")

        assert delta("mae_batch_size_count") == 2 and delta("mae_batch_size_sum") == 3  # 2 passes, 3 requests
        v1_cls = np.asarray(results["v1"].json()["cls"], dtype=np.float32)
        v2_out = next(o for o in json_header(results["v2"])["outputs"] if o["name"] == "cls")
        np.testing.assert_allclose(np.asarray(v2_out["data"], dtype=np.float32), v1_cls, rtol=1e-5, atol=1e-5)
        alone = httpx.post(url + "/v1/embed?pool=cls", content=PNG, headers={"Content-Type": "image/png"}).json()
        np.testing.assert_allclose(v1_cls, alone["cls"], rtol=1e-5, atol=1e-5)


def test_both_kinds_of_output_decode_each_image_once_on_one_mask(make_settings, monkeypatch):
    """outputs=[cls, mask, paste]: the encoder pass and the full pass run on one decode of each image, on the same mask,
    and answer as /v1/embed and /v1/reconstruct do with that mask."""
    from app.serving import imaging

    decodes: list[int] = []
    real = imaging.decode
    monkeypatch.setattr(imaging, "decode", lambda data, *a, **k: decodes.append(len(data)) or real(data, *a, **k))
    other = image_bytes(40, 56, seed=1)
    with TestClient(create_app(make_settings(warmup=False), load_in_background=False)) as c:
        body, headers = v2_body(PNG, other, outputs=("cls", "mask", "mse"), mask_ratio=0.5, seed=4)
        r = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert sorted(decodes) == sorted([len(PNG), len(other)]), decodes  # one decode per image
        out = {o["name"]: o for o in json_header(r)["outputs"]}
        for i, image in enumerate((PNG, other)):
            rec = c.post("/v1/reconstruct", params={"format": "json", "mask_ratio": 0.5, "seed": 4}, content=image,
                         headers={"Content-Type": "image/png"}).json()  # fmt: skip
            emb = c.post("/v1/embed", params={"mask_ratio": 0.5, "seed": 4, "pool": "cls"}, content=image,
                         headers={"Content-Type": "image/png"}).json()  # fmt: skip
            mask = np.asarray(out["mask"]["data"]).reshape(out["mask"]["shape"])[i]
            assert np.flatnonzero(mask).tolist() == rec["mask"]
            assert abs(out["mse"]["data"][i] - rec["mse"]) < 1e-6
            cls = np.asarray(out["cls"]["data"], dtype=np.float32).reshape(out["cls"]["shape"])[i]
            np.testing.assert_allclose(cls, emb["cls"], rtol=1e-5, atol=1e-5)


def json_header(r: httpx.Response) -> dict:
    n = r.headers.get(HEADER_LENGTH)
    return json.loads(r.content if n is None else r.content[: int(n)])


# ------------------------------------------------------------------------------------------------ overload, drain
def slow_server(weights, **env: str) -> ServerProcess:
    base = {"MAE_MAX_BATCH_SIZE": "1", "MAE_GRPC_PORT": str(free_port())}
    return server_process(weights, module="tests.launch", split_stderr=True, **{**base, **env})


def grpc_infer(address: str, timeout: float = 30) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """One ModelInfer over a plain grpcio channel (tritonclient's messages): code, details, trailing metadata."""
    req = pb.ModelInferRequest(model_name="tiny", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1])], raw_input_contents=[join_bytes([PNG])])  # fmt: skip
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
        try:
            response, c = call.with_call(req, timeout=timeout)
            assert response.outputs[0].name == "cls"
            return c.code(), "", {}
        except grpc.RpcError as e:
            return e.code(), e.details(), dict(e.trailing_metadata() or ())


def test_overload_is_503_with_retry_after_and_grpc_unavailable(weights):
    srv = slow_server(weights, MAE_MAX_QUEUE="1", MAE_TEST_FORWARD_SLEEP_S="1.0", MAE_RETRY_AFTER_S="3")
    with srv:
        address = f"127.0.0.1:{srv.env['MAE_GRPC_PORT']}"
        busy = [threading.Thread(target=grpc_infer, args=(address,)) for _ in range(2)]
        busy[0].start()
        time.sleep(0.3)  # decoded and in its 1 s forward pass
        busy[1].start()
        wait_for(srv.url, "mae_queue_depth 1.0")
        body, headers = v2_body(PNG)
        r = httpx.post(srv.url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json() == {"error": "queue full (1 images waiting)"}
        code, details, trailing = grpc_infer(address)
        assert code == grpc.StatusCode.UNAVAILABLE and details == "queue full (1 images waiting)", (code, details)
        assert trailing.get("retry-after") == "3"
        for t in busy:
            t.join(30)


def test_sigterm_drains_grpc_and_http_in_flight_and_refuses_new_calls(weights):
    # 1 s a pass: the three requests (two gRPC channels, one HTTP) reach the queue while the first computes
    srv = slow_server(weights, MAE_TEST_FORWARD_SLEEP_S="1.0", MAE_SHUTDOWN_TIMEOUT_S="120")
    proc = srv.start().proc
    try:
        srv.wait_ready()
        address = f"127.0.0.1:{srv.env['MAE_GRPC_PORT']}"
        results: list = []
        body, headers = v2_body(PNG)

        def over_grpc() -> None:
            results.append(("grpc", grpc_infer(address)[0]))

        def over_http() -> None:
            r = httpx.post(srv.url + "/v2/models/tiny/infer", content=body, headers=headers, timeout=30)
            results.append(("http", r.status_code))

        threads = [threading.Thread(target=f) for f in (over_grpc, over_grpc, over_http)]
        for t in threads:
            t.start()
        wait_for(srv.url, "mae_queue_depth 2.0")  # one computing, two queued
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        late = grpc_infer(address, timeout=5)[0]  # after the signal: refused, not queued
        for t in threads:
            t.join(30)
        rc = proc.wait(60)  # it exits once the in-flight work is answered, not at its 120-s drain budget
        assert late == grpc.StatusCode.UNAVAILABLE, late
        assert sorted(results) == [("grpc", grpc.StatusCode.OK)] * 2 + [("http", 200)], results
        assert rc == 0, (rc, srv.stderr()[-2000:])
        assert "Traceback" not in srv.stderr()
    finally:
        srv.kill()


def test_a_grpc_port_already_taken_exits_1_with_one_line(weights):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = slow_server(weights, MAE_GRPC_PORT=str(port))
        srv.start()
        rc = srv.proc.wait(60)
    err = srv.stderr().strip().splitlines()
    assert rc == 1 and err[-1].startswith("mae-serve: gRPC cannot listen on 127.0.0.1:"), (rc, err[-5:])
    assert "Traceback" not in srv.stderr()


# ------------------------------------------------------------------------------------------------ limits, docs
def test_service_limits_answer_in_the_v2_shape(make_settings):
    s = make_settings(max_body_bytes=4096, api_keys="k", max_wait_ms=0)
    with TestClient(create_app(s, load_in_background=False), raise_server_exceptions=False) as c:
        key = {"Authorization": "Bearer k"}
        big = c.post("/v2/models/tiny/infer", content=b"x" * 5000, headers=key)  # BodyGuard, before any route
        assert big.status_code == 413 and big.json() == {"error": "request body over 4096 bytes"}
        nokey = c.get("/v2/models/tiny")
        assert nokey.status_code == 401 and nokey.headers["www-authenticate"] == "Bearer"
        assert nokey.json() == {"error": "missing API key: send 'Authorization: Bearer <key>'"}
        assert c.get("/v2/health/ready").status_code == 200  # probes: no key
        assert c.get("/v1/models").json()["error"]["code"] == "unauthorized"  # /v1 keeps its own shape
        spec = c.get("/openapi.json").json()
        paths = spec["paths"]
        assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}",
                "/v2/models/{model_name}/ready", "/v2/models/{model_name}/infer",
                "/v2/models/{model_name}/versions/{model_version}/infer"} <= set(paths)  # fmt: skip
        infer = paths["/v2/models/{model_name}/infer"]["post"]
        assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
        assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert infer["security"] == [{"bearer": []}]
        assert "security" not in paths["/v2/health/ready"]["get"]
