"""Who may call what: bearer API keys on /v1 and /v2 (HTTP and gRPC), and /metrics when asked."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from app.http.errors import APIError
from app.settings import Settings


def _settings(request: Request) -> Settings:
    # The keys are settings, there from the start: no need to ask readiness (app.http.readiness) for them.
    return request.app.state.readiness.settings


async def require_api_key(request: Request) -> None:
    """With MAE_API_KEYS set, every /v1 and /v2 route needs `Authorization: Bearer <key>`. (async: FastAPI would run a
    plain function dependency in a worker thread, a hop per request for microseconds of work.)"""
    check_bearer(_settings(request).api_key_list, request.headers.get("authorization", ""))


def check_bearer(keys: list[str], authorization: str) -> None:
    """An `Authorization` value (HTTP header, gRPC metadata) against the API keys; 401 unless one matches."""
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
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


async def require_metrics_key(request: Request) -> None:
    """/metrics is open (scrapers) unless MAE_METRICS_REQUIRE_KEY=true, then it takes the /v1 API keys."""
    if _settings(request).metrics_require_key:
        await require_api_key(request)
