"""The application: `create_app()` wires settings, middleware, error handlers and routes; its lifespan loads the models.

Startup (lifespan): load every model, move it to its device and dtype, warm up, then report ready. Loading happens
after the server starts listening, so /healthz answers and /readyz says 503 meanwhile. A load failure is reported
to `on_load_failure` (mae-serve then exits 1 with one line naming the problem). The mae-serve command is app/cli.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.http import errors
from app.http.middleware import BodyGuard, InFlight, Lifecycle
from app.http.readiness import Readiness
from app.http.routes import embed, health, models, page, reconstruct
from app.openai import routes as openai_routes
from app.openai.errors import OpenAIErrorShape
from app.serving import model_thread, service
from app.serving.cpus import configure_torch_threads
from app.serving.model_thread import Forward
from app.serving.registry import ModelLoadError
from app.settings import Settings
from app.v2 import rest as v2_rest
from app.v2.errors import V2ErrorShape

WORKER_JOIN_S = 2.0  # how long a starting worker waits for a model process that is up before serving anyway
log = logging.getLogger("mae.serve")
# Outside the concurrency limit: orchestrators must always get an answer.
PROBES = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


def create_app(
    settings: Settings | None = None,
    *,
    forward: Forward = model_thread.forward,
    load_in_background: bool = True,
    on_load_failure: Callable[[str], None] | None = None,
    engine_address: str | None = None,
    serve_grpc: bool = True,
) -> FastAPI:
    """The ASGI app. `forward` runs a batch (tests pass a slow one). With load_in_background=False the lifespan loads
    before serving (tests). `engine_address`: an HTTP worker's; the model process there has the models (serving.remote).
    `serve_grpc`: False in all HTTP workers but one (MAE_GRPC_PORT has one listener)."""
    settings = settings or Settings()
    if engine_address:
        torch.set_num_threads(1)  # nothing here runs the model
    else:
        configure_torch_threads(settings.torch_threads, on_gpu=settings.device != "cpu" and torch.cuda.is_available())
    readiness = Readiness(settings, InFlight(settings.limit_concurrency))

    def failed(message: str) -> None:
        readiness.startup_error = message
        if on_load_failure is not None:
            on_load_failure(message)
        else:
            log.error("startup failed: %s", message)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        io_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="mae-io")

        async def load() -> None:
            try:
                if engine_address:
                    readiness.service = await service.start_remote(settings, engine_address, io_pool)
                else:
                    readiness.service = await service.start(settings, forward, io_pool)
            except (ModelLoadError, ValueError) as e:
                failed(str(e))
                raise
            except Exception as e:
                failed(f"{type(e).__name__}: {e}")
                raise

        grpc_server = None
        if settings.grpc_port is not None and serve_grpc:
            from app.v2 import grpc  # grpcio and the protocol's messages load only when gRPC is on

            try:
                grpc_server = await grpc.start(settings, readiness)
            except OSError as e:  # the port is taken: mae-serve exits 1 with this one line
                failed(str(e))
        task = None
        if readiness.startup_error is not None:
            pass  # the gRPC port is taken: no model to load, the server is on its way out
        elif load_in_background:
            task = asyncio.create_task(load())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # reported by `failed`; not re-logged
            if engine_address:
                # A worker that joins a model process already serving (a replacement, or one slower to import than
                # the load took) is ready in milliseconds: it accepts connections only then, so none of them is
                # answered 503 by it while the other workers serve. While the models load, it accepts at once.
                await asyncio.wait({task}, timeout=WORKER_JOIN_S)
        else:
            await load()
        try:
            yield
        finally:
            readiness.draining = True
            if task and not task.done():
                task.cancel()
            if grpc_server is not None:  # in-flight RPCs finish (the drain budget), then the engine closes
                await grpc_server.stop(settings.shutdown_timeout_s)
            if readiness.service is not None:
                await readiness.service.engine.close(settings.shutdown_timeout_s)
            io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="mae-serve",
        version="0.1.0",
        summary="Masked Autoencoder reconstructions and embeddings over HTTP",
        lifespan=lifespan,
    )
    app.state.readiness = readiness
    app.include_router(health.router)
    app.include_router(reconstruct.router)
    app.include_router(embed.router)
    app.include_router(models.router)
    app.include_router(v2_rest.router)
    app.include_router(openai_routes.router)
    page.mount(app)
    errors.install(app)
    if settings.api_key_list:
        keyed = ("/v1/", "/v2/models/")  # and /v2 itself; not the probes
        metrics_keyed = settings.metrics_require_key
        _declare_bearer(app, lambda p: p.startswith(keyed) or p == "/v2" or (p == "/metrics" and metrics_keyed))
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["*"],
        )
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(Lifecycle, inflight=readiness.inflight, retry_after_s=settings.retry_after_s, exempt=PROBES)
    app.add_middleware(V2ErrorShape)  # outermost: every /v2 error answer, whoever gave it, in v2's shape
    app.add_middleware(OpenAIErrorShape)  # and every /v1/embeddings one in OpenAI's
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
