"""Liveness, readiness and metrics. Open to everyone (no API key): orchestrators and scrapers call them."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from app.http.auth import require_metrics_key
from app.http.readiness import Readiness, readiness
from app.http.schemas import ErrorBody
from app.serving import metrics as app_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready: weights loaded and warmed up, not draining")
async def readyz(r: Annotated[Readiness, Depends(readiness)]) -> Response:
    if r.ready and r.service is not None:
        return JSONResponse({"status": "ready", "models": list(r.service.registry.entries), "pid": os.getpid()})
    status = "draining" if r.draining else "loading"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={401: {"model": ErrorBody, "description": "MAE_METRICS_REQUIRE_KEY=true and no valid key"}},
)
async def metrics() -> Response:
    body, media_type = app_metrics.render()
    return Response(body, media_type=media_type)
