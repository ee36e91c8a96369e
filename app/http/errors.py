"""The one error shape, `{"error": {"status", "code", "message"}}`, and the one place that decides a status.

The serving core raises its own exceptions, which know nothing of HTTP (`app.serving.errors`, and the model's
`DecoderMissingError`); `api_error` turns each into an `APIError` with its status, and the handlers installed by
`install` answer every error the app raises in the one shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serving import errors
from model.family import DecoderMissingError

T = TypeVar("T")

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


# The status of each refusal of the serving core; the most specific class listed wins (checked in this order).
STATUS: tuple[tuple[type[errors.ServingError], int], ...] = (
    (errors.ImageTooLarge, 413),
    (errors.UnsupportedImage, 415),
    (errors.UnreadableImage, 400),
    (errors.BadMask, 422),
    (errors.UnknownModel, 422),
    (errors.NotCapable, 422),
    (errors.Overloaded, 503),
    (errors.DeadlineExceeded, 504),
    (errors.EngineError, 500),
)


def api_error(e: Exception, retry_after_s: int) -> APIError:
    """The answer for an exception from decoding, the engine or the model; anything else is re-raised."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, DecoderMissingError):
        return APIError(422, "no_decoder", str(e))
    if isinstance(e, errors.ServingError):
        status = next(s for cls, s in STATUS if isinstance(e, cls)) if isinstance(e, _KNOWN) else 500
        headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
        return APIError(status, e.code, str(e), headers)
    raise e


_KNOWN = tuple(cls for cls, _ in STATUS)


def per_image(results: Sequence[T | BaseException], retry_after_s: int) -> list[T | APIError]:
    """`pipeline.each`'s results with every refusal as its answer (an unexpected exception is raised)."""
    out: list[T | APIError] = []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            out.append(api_error(r, retry_after_s))
        else:
            out.append(r)
    return out


def all_or_nothing(results: Sequence[T | APIError], label: str = "image {i}") -> list[T]:
    """For answers with no per-image errors (binary /v1 formats, v2, OpenAI): the first refused image fails the
    request, its message naming which one (`label` with its index: "image 1: ...") when there were several."""
    done: list[T] = []
    for i, r in enumerate(results):
        if isinstance(r, APIError):
            if len(results) > 1:
                raise APIError(r.status, r.code, f"{label.format(i=i)}: {r.message}", r.headers)
            raise r
        done.append(r)
    return done


def one_or_each(results: Sequence[T | APIError], body: Callable[[T], Any]) -> Any:
    """/v1's JSON answer (reconstruct, embed), per `per_image`'s results: one image -> its `body`, or its refusal
    raised (the request answers that image's status); several -> a list in order, each image's `body` or, for a
    refused one, its error's (ImageFailure), the request answering 200."""
    if len(results) == 1:
        only = results[0]
        if isinstance(only, APIError):
            raise only
        return body(only)
    return [r.body() if isinstance(r, APIError) else body(r) for r in results]


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

    @app.exception_handler(errors.ServingError)
    async def _serving(request: Request, e: errors.ServingError) -> JSONResponse:
        return api_error(e, request.app.state.readiness.settings.retry_after_s).response()

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
