"""Helpers for the service tests: tiny weights, test images, an in-process client and a real uvicorn server."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model import MAE, get_config
from model.checkpoint import save


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


@contextlib.contextmanager
def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(settings: Settings, wait_ready: bool = True) -> Iterator[tuple[str, uvicorn.Server]]:
    """uvicorn on a free loopback port in a thread; yields (base URL, server)."""
    port = free_port()
    app = create_app(settings.model_copy(update={"port": port}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    app.state.mae.extra["server"] = server
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
