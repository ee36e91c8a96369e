"""The process's life: a real `python -m app.cli` (what `mae-serve` runs) drains on SIGTERM and exits 0; bad
weights stop the start with exit code 1 and one line on stderr; out of memory splits a batch, then answers 503.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.harness import ServerProcess
from tests.serving import app_client, assert_error, image_bytes, server_process

pytestmark = pytest.mark.integration

PNG = image_bytes(16, 16)


def server(module: str = "app.cli", **env: str) -> ServerProcess:
    return server_process(None, module=module, split_stderr=True, **{"MAE_MAX_WAIT_MS": "5", **env})


def test_sigterm_under_load_drains_and_exits_0(weights):
    grace = 10.0
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    srv = server(
        "tests.launch",
        MAE_WEIGHTS=str(weights),
        MAE_WEIGHTS_SHA256=sha,  # the right pin: starts
        MAE_MAX_BATCH_SIZE="1",
        MAE_MAX_WAIT_MS="0",
        MAE_SHUTDOWN_TIMEOUT_S=str(grace),
        MAE_TEST_FORWARD_SLEEP_S="0.25",
    )
    proc, url = srv.start().proc, srv.url
    try:
        srv.wait_ready()
        keep_alive = httpx.Client(base_url=url, timeout=30)
        assert keep_alive.get("/readyz").status_code == 200  # the connection a load balancer holds open
        results: list = []

        def one() -> None:
            try:
                r = httpx.post(url + "/v1/embed", content=PNG, headers={"Content-Type": "image/png"}, timeout=30)
                results.append(r.status_code)
            except httpx.HTTPError as e:
                results.append(repr(e))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=5) as probe:  # wait until 1 computes and 3 wait in the queue
            while "mae_queue_depth 3.0" not in probe.get("/metrics").text:
                time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            r = keep_alive.get("/readyz")
            readyz = (r.status_code, r.json().get("status"))
        except httpx.TransportError:  # uvicorn closes idle connections ~0.1 s after the signal; a LB sees "down"
            readyz = ("closed", None)
        for t in threads:
            t.join(30)
        rc = proc.wait(grace + 10)
        drain = time.monotonic() - t0
        err = srv.stderr()
        print(f"\nSIGTERM: /readyz on the kept-alive connection -> {readyz}; in-flight {results}; exit {rc} after "
              f"{drain:.2f} s (grace {grace:.0f} s)")  # fmt: skip
        assert readyz in ((503, "draining"), ("closed", None)), readyz  # never 200 once the signal is in
        assert results == [200] * 4, results  # all in-flight and queued requests completed
        assert rc == 0, err
        assert 0.5 < drain < grace, drain  # waited for the ~0.75 s of queued work, not for the grace period
        assert "Traceback" not in err, err
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        srv.kill()


def test_draining_flag_is_set_synchronously_by_the_signal_handler(make_settings):
    """What makes /readyz 503 'at once': the handler itself marks the app draining, before uvicorn's next tick."""
    import uvicorn

    from app.http.server import Server

    with app_client(make_settings()) as c:
        assert c.get("/readyz").status_code == 200
        srv = Server(uvicorn.Config(c.app), c.app.state.readiness, drain_s=20)
        srv.handle_exit(signal.SIGTERM, None)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "draining"} and r.headers["retry-after"] == "1"
        assert srv.should_exit


def tamper_header(src: Path, dst: Path) -> None:
    """Change one tensor's declared shape in the safetensors JSON header (same length, so offsets still parse)."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = header[name]["shape"][::-1] if header[name]["shape"][0] != header[name]["shape"][1] else [
        header[name]["shape"][0] * 2, header[name]["shape"][1] // 2]  # fmt: skip
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    dst.write_bytes(data[:8] + raw + data[8 + n :])


def test_bad_weights_exit_1_with_one_line(tmp_path, weights):
    good = weights.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    tamper_header(weights, tmp_path / "header.safetensors")
    flipped = bytearray(good)
    flipped[-100] ^= 0x01  # one bit of one weight: only a pin can tell
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    pin = hashlib.sha256(good).hexdigest()
    cases = {
        "missing": ({"MAE_WEIGHTS": str(tmp_path / "nope.safetensors")}, "not found"),
        "truncated": ({"MAE_WEIGHTS": str(tmp_path / "truncated.safetensors")}, "truncated"),
        "empty": ({"MAE_WEIGHTS": str(tmp_path / "empty.safetensors")}, "empty"),
        "header": ({"MAE_WEIGHTS": str(tmp_path / "header.safetensors")}, "shape mismatch"),
        "flipped+pin": (
            {"MAE_WEIGHTS": str(tmp_path / "flipped.safetensors"), "MAE_WEIGHTS_SHA256": pin},
            "MAE_WEIGHTS_SHA256",
        ),
    }
    t = time.monotonic()
    procs = {name: server(**env).start() for name, (env, _) in cases.items()}  # in parallel: each imports torch
    procs["bad pin"] = server(MAE_WEIGHTS_SHA256="xyz").start()  # a setting mae-serve refuses up front
    outcomes = {}
    for name, p in procs.items():
        rc = p.proc.wait(timeout=120)
        outcomes[name] = (rc, p.stderr().strip().splitlines())
    assert outcomes.pop("bad pin") == (
        2,
        ["mae-serve: bad setting: bad MAE_WEIGHTS_SHA256 entry 'xyz': expected 64 hex digits"],
    )
    print(f"\nbad weights: {len(cases)} starts in {time.monotonic() - t:.1f} s")
    for name, (rc, lines) in outcomes.items():
        print(f"  {name}: exit {rc}: {lines}")
        assert rc == 1, (name, rc, lines)
        assert len(lines) == 1 and lines[0].startswith("mae-serve: "), (name, lines)  # one line, no traceback
        assert cases[name][1].lower() in lines[0].lower(), (name, lines)


# ------------------------------------------------------------------------------------------------ out of memory
def fake_oom(monkeypatch, model, fail_at: int) -> list[int]:
    """model.reconstruct raises torch.OutOfMemoryError for batches >= fail_at; returns the batch sizes tried."""
    tried: list[int] = []
    real = model.reconstruct

    def reconstruct(x, masking=None):
        tried.append(int(x.shape[0]))
        if x.shape[0] >= fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(x, masking)

    monkeypatch.setattr(model, "reconstruct", reconstruct)
    return tried


def test_out_of_memory_splits_the_batch_then_answers_503(make_settings, monkeypatch):
    # The 4 images make one batch: the engine waits for images still being decoded until each is queued (a race
    # there split them 3 + 1 under load: tests/test_engine.py pins it).
    s = make_settings(max_batch_size=4, max_wait_ms=500, warmup=False)
    body = {"images": [base64.b64encode(image_bytes(seed=i)).decode() for i in range(4)], "seed": 3, "format": "json"}
    with app_client(s) as c:
        reference = c.post("/v1/reconstruct", json=body)
        assert reference.status_code == 200
        model = c.app.state.readiness.service.registry.entries["tiny"].model

        tried = fake_oom(monkeypatch, model, fail_at=2)  # only single images fit
        r = c.post("/v1/reconstruct", json=body)
        assert r.status_code == 200 and all("images" in x for x in r.json()), r.text[:300]
        assert tried == [4, 2, 1, 1, 2, 1, 1], tried  # halved until it fit
        assert [x["mse"] for x in r.json()] == pytest.approx([x["mse"] for x in reference.json()], rel=1e-5)

        tried = fake_oom(monkeypatch, model, fail_at=1)  # nothing fits
        r = c.post("/v1/reconstruct", content=PNG, headers={"Content-Type": "image/png"})
        assert "out of memory" in assert_error(r, 503, "overloaded")["message"] and r.headers["retry-after"] == "1"
        r = c.post("/v1/reconstruct", json=body)  # several images: each answers its own 503
        assert r.status_code == 200 and [x["error"]["status"] for x in r.json()] == [503] * 4

        monkeypatch.undo()  # memory is back: the engine serves again
        assert c.post("/v1/reconstruct", json=body).status_code == 200
