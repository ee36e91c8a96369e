"""Helpers for the service tests: tiny weights, test images, an in-process client, a uvicorn server in a thread, and
the one check of an error answer. A server in its own process is tests.harness.ServerProcess."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from app.http.main import create_app
from app.http.server import uvicorn_config
from app.serving import model_thread
from app.serving.model_thread import Forward
from app.settings import Settings
from model import MAE, get_config
from model.formats import save
from tests.harness import ServerProcess, free_port


def make_weights(folder: Path, name: str = "tiny", config: str = "mae_test", seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    path = folder / f"{name}.safetensors"
    save(MAE(get_config(config).replace(**changes)), path)
    return path


def image_bytes(w: int = 48, h: int = 40, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def assert_error(r: httpx.Response, status: int | set[int], code: str | set[str] | None = None) -> dict:
    """`r` is an error answer with this status (and code), in the one shape (OpenAI's on /v1/embeddings, whose clients
    expect it); returns its `error` object."""
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    err = r.json()["error"]
    if r.request.url.path == "/v1/embeddings":
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    else:
        assert set(err) == {"status", "code", "message"} and err["status"] == r.status_code and err["message"], err
    if code is not None:
        assert err["code"] in ({code} if isinstance(code, str) else code), err
    return err


# What every test server starts from: on the CPU, no warm-up (the test models need none), no batching wait.
TEST_ENV = {"MAE_DEVICE": "cpu", "MAE_WARMUP": "false", "MAE_MAX_WAIT_MS": "0"}


def server_process(
    weights: Path | None,
    *,
    module: str = "app.cli",
    prefix: tuple[str, ...] = (),
    split_stderr: bool = False,
    **env: str,
) -> ServerProcess:
    """mae-serve (or `module`, e.g. tests.launch) as a process on a free port, with TEST_ENV, `weights` and `env`."""
    base = {**TEST_ENV, **({"MAE_WEIGHTS": str(weights)} if weights is not None else {})}
    return ServerProcess({**base, **env}, module=module, prefix=prefix, split_stderr=split_stderr)


def post_image(
    url: str, path: str, data: bytes, ctype: str = "image/png", timeout: float = 60, **params: Any
) -> httpx.Response:
    """One image as the raw body of a POST to a server process."""
    return httpx.post(url + path, content=data, headers={"Content-Type": ctype}, params=params, timeout=timeout)


def counter_value(counter: Any, *labels: str) -> float:
    """A Prometheus counter's value for these label values, read through `collect()` (its public API)."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and tuple(sample.labels.values()) == labels:
                return float(sample.value)
    return 0.0


@contextlib.contextmanager
def app_client(settings: Settings, forward: Forward = model_thread.forward, **kw) -> Iterator[TestClient]:
    with TestClient(create_app(settings, forward=forward, load_in_background=False), **kw) as c:
        yield c


@contextlib.contextmanager
def live_server(
    settings: Settings, wait_ready: bool = True, forward: Forward = model_thread.forward
) -> Iterator[tuple[str, uvicorn.Server]]:
    """uvicorn on a free loopback port in a thread; yields (base URL, server)."""
    port = free_port()
    server: uvicorn.Server | None = None

    def stop(_: str) -> None:
        if server is not None:
            server.should_exit = True

    quiet = "warning" if settings.log_level == "info" else settings.log_level  # no access log in the test output
    settings = settings.model_copy(update={"port": port, "host": "127.0.0.1", "log_level": quiet})
    app = create_app(settings, forward=forward, on_load_failure=stop)
    server = uvicorn.Server(uvicorn_config(app, settings))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=1)
            if r.status_code == 200 or not wait_ready:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    else:
        raise RuntimeError("server did not become ready")
    try:
        yield url, server
    finally:
        server.should_exit = True
        t.join(timeout=30)
