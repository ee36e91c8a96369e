"""The application: create_app() wires settings, models, engine and routes; `mae-serve` runs it.

Startup (lifespan): load every model, move it to its device and dtype, warm up, then report ready. Loading
happens after the server starts listening, so /healthz answers and /readyz says 503 meanwhile. A load failure
ends the process with exit code 1 and one line naming the problem. On SIGTERM /readyz turns 503 at once,
in-flight requests finish (up to MAE_SHUTDOWN_TIMEOUT_S), then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app import server as http_server
from app.deps import AppState
from app.engine import Engine, model_thread
from app.middleware import BodyGuard, InFlight, Lifecycle
from app.registry import ModelLoadError, Registry
from app.routes import embed, health, models, reconstruct
from app.schemas import APIError
from app.settings import Settings
from model.masking import Masking, len_keep_for_ratio, random_noise

log = logging.getLogger("mae.serve")
STATIC = Path(__file__).resolve().parent / "static"
PROBES = ("/healthz", "/readyz", "/metrics")  # outside the concurrency limit: orchestrators must always get an answer


# ---------------------------------------------------------------------------------------------- page
class RevalidatedStaticFiles(StaticFiles):
    """The web page's files, revalidated (ETag) on every load, so an upgrade never leaves a page half stale."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


# ---------------------------------------------------------------------------------------------- startup
def warm_up(engine: Engine, registry: Registry, max_batch: int) -> None:
    """Run every shape the server will run first: batch 1 and a small batch, embed and reconstruct."""
    for entry in registry.entries.values():
        c = entry.config
        n = c.num_patches
        for b in sorted({1, min(max_batch, 4)}):
            images = torch.rand(b, c.in_chans if hasattr(c, "in_chans") else 3, c.img_size, c.img_size)
            engine.run_sync(entry, "embed", images, None)
            if c.has_decoder:
                masking = Masking(random_noise(b, n, seed=0), len_keep_for_ratio(n, 0.75))
                engine.run_sync(entry, "reconstruct", images, masking)


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


async def load_models(app: FastAPI) -> None:
    state: AppState = app.state.mae
    s = state.settings
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        # On the model thread, like warm-up and every batch: see app.engine.model_thread for why.
        registry = await loop.run_in_executor(model_thread(), Registry.from_settings, s)
        check_pins(registry, s.weight_pins())
    except (ModelLoadError, ValueError) as e:
        state.startup_error = str(e)
        raise
    engine = Engine(
        registry,
        max_batch_size=s.max_batch_size,
        max_wait_ms=s.max_wait_ms,
        max_queue=s.max_queue,
        cpu_kernels=s.cpu_kernels,
        cpu_max_batch_size=s.cpu_max_batch_size,
    )
    if s.warmup:
        await loop.run_in_executor(model_thread(), warm_up, engine, registry, s.max_batch_size)
    engine.start()
    state.registry, state.engine = registry, engine
    state.ready = True
    log.info("ready in %.2f s: %s", time.perf_counter() - t0, ", ".join(registry.entries))


def create_app(settings: Settings | None = None, *, load_in_background: bool = True) -> FastAPI:
    """The ASGI app. With load_in_background=False the lifespan loads before serving (tests)."""
    settings = settings or Settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.mae
        state.io_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="mae-io")
        task = None
        if load_in_background:
            task = asyncio.create_task(load_models(app))
            task.add_done_callback(lambda t: _on_loaded(app, t))
        else:
            await load_models(app)
        try:
            yield
        finally:
            state.ready, state.draining = False, True
            if task and not task.done():
                task.cancel()
            if state.engine:
                await state.engine.close(settings.shutdown_timeout_s)
            state.io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="mae-serve",
        version="0.1.0",
        summary="Masked Autoencoder reconstructions and embeddings over HTTP",
        lifespan=lifespan,
    )
    app.state.mae = AppState(settings=settings, inflight=InFlight(settings.limit_concurrency))
    app.include_router(health.router)
    app.include_router(reconstruct.router)
    app.include_router(embed.router)
    app.include_router(models.router)
    _add_error_handlers(app)
    if settings.api_key_list:
        _declare_bearer(app, lambda p: p.startswith("/v1/") or (p == "/metrics" and settings.metrics_require_key))
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["*"],
        )
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(Lifecycle, inflight=app.state.mae.inflight, retry_after_s=settings.retry_after_s, exempt=PROBES)
    if (STATIC / "index.html").exists():
        app.mount("/static", RevalidatedStaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return app


def _declare_bearer(app: FastAPI, protected: Callable[[str], bool]) -> None:
    """With API keys on, OpenAPI declares the HTTP bearer scheme on the routes that need it (/docs can send it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "one of MAE_API_KEYS"}
            for path, operations in schema["paths"].items():
                if protected(path):
                    for op in operations.values():
                        op["security"] = [{"bearer": []}]
        return app.openapi_schema  # type: ignore[return-value]  # set by generate()

    app.openapi = openapi  # type: ignore[method-assign]


def _on_loaded(app: FastAPI, task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is None:
        return
    state: AppState = app.state.mae
    e = task.exception()
    msg = state.startup_error = state.startup_error or f"{type(e).__name__}: {e}"
    if not state.extra.get("cli"):  # mae-serve prints it itself, as its one line on stderr, on the way out
        log.error("startup failed: %s", msg)
    server = app.state.mae.extra.get("server")
    if server is not None:
        server.should_exit = True


def _add_error_handlers(app: FastAPI) -> None:
    def answer(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return answer(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body")) or "request"
        return answer(APIError(422, "bad_parameter", f"{where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return answer(APIError(e.status_code, code, str(e.detail), dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return answer(APIError(500, "internal_error", "internal error; see the server log"))


# ---------------------------------------------------------------------------------------------- CLI
DRAIN_MARGIN_S = 1.0  # past the drain budget, the time uvicorn gets to send the 503s and close, before it cancels


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="mae-serve",
        description="Serve a Masked Autoencoder over HTTP. Every "
        "option is also an environment variable MAE_<NAME>; see the README.",
    )
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--weights", help="a weights path, or name=path,name2=path2")
    ap.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--max-batch-size", type=int)
    ap.add_argument("--max-wait-ms", type=float)
    ap.add_argument("--log-level")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
        settings.weight_specs()
        settings.weight_pins()
    except ValueError as e:
        print(f"mae-serve: bad setting: {e}".splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    before, open_files, hard = http_server.raise_open_file_limit()
    max_connections = http_server.connection_cap(settings.max_connections, open_files, settings.limit_concurrency)
    log.info("open files: soft limit %d -> %d (hard %d); at most %d connections", before, open_files, hard,
             max_connections)  # fmt: skip
    app = create_app(settings)
    state: AppState = app.state.mae
    limits = http_server.ConnectionLimits(max_connections, settings.header_timeout_s)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=http_server.protocol_for(limits),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        # A backstop: requests left at the drain deadline are answered 503 by the app (middleware.InFlight) first.
        timeout_graceful_shutdown=settings.shutdown_timeout_s + DRAIN_MARGIN_S,  # type: ignore[arg-type]
        server_header=False,
    )

    server = http_server.Server(config, state, drain_s=settings.shutdown_timeout_s)
    state.extra.update(server=server, cli=True)
    # After a graceful shutdown uvicorn re-raises the signal it caught, under the handler that was there before
    # it started; with Python's defaults the process would then die by SIGTERM (143) or a KeyboardInterrupt
    # traceback. A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    code = 0
    if state.startup_error:
        print(f"mae-serve: {state.startup_error}".splitlines()[0], file=sys.stderr)
        code = 1
    # Exit now: the interpreter's own exit would join the worker threads, and a decode still running for a request
    # that was already answered 503 must not hold the process past its drain budget.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
