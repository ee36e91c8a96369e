"""The app's life for its front-ends: loading (no Service yet) -> ready -> draining, and the dependencies that hand
the routes the Service (503 until the models are loaded and warm, and while draining).

`Readiness` exists from the moment the app is created (the probes need it while the models load); the Service
(app.serving.service) once the models are loaded and warm. It is `app.state.readiness`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from app.http.errors import APIError
from app.http.middleware import InFlight
from app.serving.service import Service
from app.settings import Settings


@dataclass
class Readiness:
    """The app's life: loading (service None) -> ready -> draining. `app.state.readiness`."""

    settings: Settings
    inflight: InFlight
    service: Service | None = None
    draining: bool = False
    startup_error: str | None = None
    on_drain: list[Callable[[float], None]] = field(default_factory=list)  # other front-ends' graceful stops (gRPC)

    def service_or_503(self) -> Service:
        """The service, for work that needs the model (HTTP routes, gRPC calls): 503 while loading or draining."""
        if self.service is None or self.draining:
            raise APIError(503, "not_ready", "the model is still loading or the server is shutting down",
                           {"Retry-After": str(self.settings.retry_after_s)})  # fmt: skip
        return self.service

    @property
    def ready(self) -> bool:
        return self.service is not None and not self.draining

    def drain(self, budget_s: float) -> None:
        """At the shutdown signal, on the event loop: what is not answering `budget_s` from now gets 503, and every
        other front-end starts its own graceful stop with the same budget."""
        self.inflight.drain(budget_s)
        for hook in self.on_drain:
            hook(budget_s)


def get_readiness(request: Request) -> Readiness:
    return request.app.state.readiness


async def readiness(request: Request) -> Readiness:
    """get_readiness as a dependency (async: FastAPI runs a plain function dependency in a worker thread, a hop per
    request for microseconds of work)."""
    return get_readiness(request)


async def get_service(request: Request) -> Service:
    """For routes that need the model: 503 until the models are loaded and warm, and while draining."""
    return get_readiness(request).service_or_503()
