"""/v2's error shape: the Open Inference Protocol's {"error": "<message>"}, for every error answer on a /v2 path.

`V2ErrorShape` (installed by app.http.main, outermost) rewrites the service's one error shape (app.http.errors) on
/v2 paths, whoever gave the error (a route, auth, the body and concurrency limits); the statuses and headers stay,
so Retry-After, WWW-Authenticate and the metrics are /v1's. gRPC's errors are status codes (app/v2/grpc.py).
"""

from __future__ import annotations

from typing import Any

from app.http.middleware import ErrorShape

PREFIX = "/v2"  # where the protocol's REST routes live (app/v2/rest.py)


class V2ErrorShape(ErrorShape):
    """On /v2 paths, error answers in the protocol's shape: {"error": "<message>"}."""

    def applies(self, path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def shape(self, error: dict[str, Any], status: int) -> Any:
        return {"error": error["message"]}
