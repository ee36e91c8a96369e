"""What the /v1 routes share: OpenAPI for the three input forms, deadlines, running several images."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from app.deps import AppState
from app.pipeline import draw_seed
from app.registry import ModelEntry
from app.schemas import APIError

DEADLINE_HEADER = "X-MAE-Deadline-Ms"


def request_body_doc(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody for multipart / raw image / JSON, so /docs 'Try it out' works for each."""
    binary = {"type": "string", "format": "binary"}
    return {
        "parameters": [
            {
                "name": DEADLINE_HEADER,
                "in": "header",
                "required": False,
                "description": "queueing budget in ms: a request still waiting for the model after it gets 504",
                "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3_600_000},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "array", "items": binary, "minItems": 1}, **params},
                        "required": ["image"],
                    },
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp"}},
                },
                "image/png": {"schema": binary},
                "image/jpeg": {"schema": binary},
                "image/webp": {"schema": binary},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "string", "description": "base64 PNG/JPEG/WebP"},
                            "images": {"type": "array", "items": {"type": "string"}},
                            **params,
                        },
                    }
                },
            },
        },
    }


def deadline_from(request: Request) -> float | None:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not (0 < ms <= 3_600_000):
        raise APIError(422, "bad_parameter", f"{DEADLINE_HEADER} must be milliseconds in (0, 3600000]")
    return time.monotonic() + ms / 1000.0


async def run_each(images: list[bytes], fn: Callable[[bytes], Awaitable[Any]]) -> list[Any | APIError]:
    """Run fn on every image concurrently (so they can share a batch); errors stay per image."""
    results = await asyncio.gather(*(fn(b) for b in images), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, APIError):
            raise r
    return results


def query_dict(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        if k in out:
            raise APIError(422, "bad_parameter", f"query parameter {k!r} given more than once")
        out[k] = v
    return out


def resolve(state: AppState, request: Request, params: Any) -> tuple[ModelEntry, int, float | None]:
    """The model a request names (422 if unknown), its seed (drawn when absent) and its deadline."""
    assert state.registry is not None
    if params.model is not None and params.model not in state.registry:
        loaded = ", ".join(state.registry.entries)
        raise APIError(422, "unknown_model", f"unknown model {params.model!r}; loaded: {loaded}")
    seed = params.seed if params.seed is not None else draw_seed()
    return state.registry.get(params.model), seed, deadline_from(request)
