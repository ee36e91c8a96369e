"""FastAPI dependencies: the app's shared objects, authentication and readiness."""

from __future__ import annotations

import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from app.engine import Engine
from app.middleware import InFlight
from app.registry import Registry
from app.schemas import APIError
from app.settings import Settings


@dataclass
class AppState:
    """Everything a request may need, built once by the lifespan."""

    settings: Settings
    inflight: InFlight
    registry: Registry | None = None
    engine: Engine | None = None
    io_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    startup_error: str | None = None
    extra: dict = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    return request.app.state.mae


def ready_state(request: Request) -> AppState:
    """For /v1 routes that need the model: 503 until warm, and while draining."""
    state = get_state(request)
    if not state.ready or state.registry is None or state.engine is None:
        raise APIError(
            503,
            "not_ready",
            "the model is still loading or the server is shutting down",
            {"Retry-After": str(state.settings.retry_after_s)},
        )
    return state


def require_api_key(request: Request) -> None:
    """With MAE_API_KEYS set, every /v1 route needs `Authorization: Bearer <key>`."""
    keys = get_state(request).settings.api_key_list
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
        )
    # Compare against every key, always, so the time taken does not reveal which key or prefix matched; compare
    # digests, so it does not reveal a key's length either (compare_digest returns early on unequal lengths).
    given = hashlib.sha256(token.encode()).digest()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, hashlib.sha256(k.encode()).digest())
    if not ok:
        raise APIError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": "Bearer"})


def require_metrics_key(request: Request) -> None:
    """/metrics is open (scrapers) unless MAE_METRICS_REQUIRE_KEY=true, then it takes the /v1 API keys."""
    if get_state(request).settings.metrics_require_key:
        require_api_key(request)
