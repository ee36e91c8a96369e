"""The one error shape, `{"error": {"status", "code", "message"}}`, and the one place that decides a status.

Lower layers raise their own exceptions, which know nothing of HTTP (`imaging.ImageError`, the engine's
`EngineError`s, `model.DecoderMissingError`); `api_error` turns each into an `APIError` with its status, and the
handlers installed by `install` answer every error the app raises in the one shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import imaging
from app.engine import ComputeFailed, DeadlineExceeded, EngineError, Overloaded
from model.family import DecoderMissingError

log = logging.getLogger("mae.errors")


class APIError(Exception):
    """Any error answer. Leaves the service as {"error": {"status", "code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_IMAGE_STATUS: dict[type[imaging.ImageError], int] = {
    imaging.ImageTooLarge: 413,
    imaging.UnsupportedImage: 415,
    imaging.UnreadableImage: 400,
}


def api_error(e: Exception, retry_after_s: int) -> APIError:
    """The answer for an exception from decoding, the engine or the model."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, imaging.ImageError):
        return APIError(_IMAGE_STATUS[type(e)], e.code, str(e))
    if isinstance(e, Overloaded):
        return APIError(503, "overloaded", str(e), {"Retry-After": str(retry_after_s)})
    if isinstance(e, DeadlineExceeded):
        return APIError(504, "deadline_exceeded", str(e))
    if isinstance(e, DecoderMissingError):
        return APIError(422, "no_decoder", str(e))
    if isinstance(e, ComputeFailed | EngineError):
        return APIError(500, "compute_failed", str(e))
    raise e


def from_validation(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Pydantic's (or FastAPI's) validation errors -> one 422 naming the first problem and where it is."""
    first: Mapping[str, Any] = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "body")]
    where = ".".join(loc) or "parameters"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown parameter"
    return APIError(422, "bad_mask" if loc[:1] == ["mask"] else "bad_parameter", f"{where}: {msg}")


def install(app: FastAPI) -> None:
    """Every error the app raises leaves in the one shape; an unexpected one is logged once, with its traceback."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation(e.errors()).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, e: ValidationError) -> JSONResponse:
        return from_validation(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return APIError(e.status_code, code, str(e.detail), dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, "internal_error", "internal error; see the server log").response()
