"""/v1/embeddings' errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`OpenAIError` is an APIError that also names the request field at fault (OpenAI's `param`); `OpenAIErrorShape`
(installed by app.http.main, outermost) rewrites the service's one error shape (app.http.errors) on this path,
whoever gave the error (the route, auth, the body and concurrency limits), so statuses and headers (Retry-After,
WWW-Authenticate) stay /v1's.
"""

from __future__ import annotations

from typing import Any

from app.http.errors import APIError
from app.http.middleware import ErrorShape

PATH = "/v1/embeddings"  # the route (app/openai/routes.py)


class OpenAIError(APIError):
    """An APIError that names the request field at fault (OpenAI's `param`)."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, code, message, headers)
        self.param = param

    @classmethod
    def of(cls, e: APIError, param: str | None, prefix: str = "") -> OpenAIError:
        return cls(e.status, e.code, prefix + e.message, param, dict(e.headers))

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["param"] = self.param
        return body


_TYPES = {401: "authentication_error", 403: "permission_error"}


class OpenAIErrorShape(ErrorShape):
    """On /v1/embeddings, error answers in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def applies(self, path: str) -> bool:
        return path == PATH

    def shape(self, error: dict[str, Any], status: int) -> Any:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {
            "error": {"message": error["message"], "type": kind, "param": error.get("param"), "code": error.get("code")}
        }
