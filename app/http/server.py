"""uvicorn, hardened for a public endpoint: what the HTTP server itself must bound before the app sees a request.

- A request head must arrive within `header_timeout_s` (408, then close): a silent or slow-loris connection cannot
  hold a descriptor for ever.
- At most `max_connections` open connections, kept below the open-file limit (raised to its hard limit at start):
  the server never runs out of descriptors. At the cap, the longest-idle connection makes room for a new one.
- A failed accept() is logged once per interval, not once per attempt.
- On SIGTERM the app is marked draining at once (/readyz 503) and requests still unanswered at the drain deadline
  get a JSON 503 (app.http.middleware.InFlight).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from app.http.middleware import FRAMING_ERROR
from app.http.readiness import Readiness
from app.serving import metrics
from app.settings import Settings

log = logging.getLogger("mae.server")

FD_RESERVE = 64  # descriptors kept for everything but connections: weights, logs, threads' pipes, ...
ACCEPT_LOG_INTERVAL_S = 10.0


def raise_open_file_limit() -> tuple[int, int, int]:
    """Soft RLIMIT_NOFILE -> its hard limit (the common soft default of 1,024 is a few hundred clients).

    Returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return soft, max(soft, target), hard


def connection_cap(max_connections: int, open_files: int, limit_concurrency: int) -> int:
    """Connections the server keeps open: the setting, but below the open-file limit, with room for every request
    in progress to hold one more descriptor (a multipart upload spooled to a temporary file)."""
    return max(1, min(max_connections, open_files - FD_RESERVE - limit_concurrency))


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    max_header_bytes: int = 16 * 1024


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"status": status, "code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Guard(asyncio.Protocol):
    """A request-head timeout and a connection cap (see the module docstring), for either of uvicorn's HTTP/1.1
    protocols: it hooks only what both have (connection_made/lost, data_received, on_response_complete,
    send_400_response, `cycle`, `connections`, `transport`, `loop`)."""

    limits = ConnectionLimits(max_connections=2048, header_timeout_s=10.0)  # replaced by `protocol_for`
    _head_timer: asyncio.TimerHandle | None = None
    _idle_since: float | None = None  # waiting for a request head since (monotonic); None = a request in progress
    _head_bytes = 0  # bytes received while waiting for a request head

    # Provided by the uvicorn protocol this is mixed into.
    cycle: Any
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    # ------------------------------------------------------------------ connections
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = time.monotonic()
        metrics.OPEN_CONNECTIONS.set(len(self.connections))
        if len(self.connections) > self.limits.max_connections:
            idle = [c for c in self.connections if isinstance(c, _Guard) and c is not self
                    and c._idle_since is not None]  # fmt: skip
            if idle:
                min(idle, key=lambda c: c._idle_since or 0.0)._drop("evicted")
            else:
                metrics.CONNECTIONS_DROPPED.labels("over_limit").inc()
                transport.write(_raw_error(503, "Service Unavailable", "overloaded", "too many open connections"))
                transport.close()
                return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        metrics.OPEN_CONNECTIONS.set(len(self.connections))

    def _drop(self, reason: str) -> None:
        metrics.CONNECTIONS_DROPPED.labels(reason).inc()
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ the request head's time limit
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._idle_since is None:
            return
        metrics.CONNECTIONS_DROPPED.labels("header_timeout").inc()
        why = f"the request head did not arrive within {self.limits.header_timeout_s:g} s"
        self.transport.write(_raw_error(408, "Request Timeout", "request_timeout", why))
        self.transport.close()

    def _started_if_new(self, previous: Any) -> bool:
        if self.cycle is not previous and self.cycle is not None and not self.cycle.response_complete:
            self._idle_since, self._head_bytes = None, 0  # a request head arrived and its request started
            self._disarm_head_timer()
            return True
        return False

    def data_received(self, data: bytes) -> None:
        waiting = self._idle_since is not None
        if waiting:  # bytes of a new request head: its clock starts (or runs on)
            self._arm_head_timer()
            self._head_bytes += len(data)
        previous = self.cycle
        super().data_received(data)
        if not self._started_if_new(previous) and waiting and self._head_bytes > self.limits.max_header_bytes:
            # h11 stops at its own limit; httptools has none: a head that never ends would grow without bound.
            metrics.CONNECTIONS_DROPPED.labels("header_too_large").inc()
            why = f"the request head is over {self.limits.max_header_bytes} bytes"
            self.transport.write(_raw_error(431, "Request Header Fields Too Large", "header_too_large", why))
            self.transport.close()

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()  # waiting for the next head; uvicorn's keep-alive timer runs
        previous = self.cycle
        super().on_response_complete()  # type: ignore[misc]
        self._started_if_new(previous)  # a pipelined request may start at once

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[FRAMING_ERROR] = True  # the app counts a 400, not 499
        super().send_400_response(msg)  # type: ignore[misc]


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 (pure Python) protocol, guarded."""


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools (llhttp, C) protocol, guarded."""


HttpImpl = Literal["auto", "h11", "httptools"]


def protocol_for(limits: ConnectionLimits, http: HttpImpl = "auto") -> type[_Guard]:
    """The guarded protocol class with these limits; auto = httptools (a C parser) where it is installed."""
    if http == "httptools" and HttpToolsProtocol is None:
        raise RuntimeError("MAE_HTTP=httptools but httptools is not installed")
    fast = http != "h11" and HttpToolsProtocol is not None
    base: type[_Guard] = GuardedHttpToolsProtocol if fast else GuardedH11Protocol
    return type(base.__name__, (base,), {"limits": limits})


DRAIN_MARGIN_S = 1.0  # past the drain budget, the time uvicorn gets to send the 503s and close, before it cancels


def uvicorn_config(app: Any, settings: Settings, max_connections: int | None = None) -> uvicorn.Config:
    """The uvicorn configuration mae-serve runs: the guarded protocol, the settings' parser, loop and timeouts."""
    limits = ConnectionLimits(
        max_connections or settings.max_connections, settings.header_timeout_s, settings.max_header_bytes
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=protocol_for(limits, settings.http),
        loop=settings.loop,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        # A backstop: requests left at the drain deadline are answered 503 by the app (middleware.InFlight) first.
        timeout_graceful_shutdown=settings.shutdown_timeout_s + DRAIN_MARGIN_S,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,
    )


def install_accept_error_throttle(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs every failed accept() (out of descriptors), and retries many times a second: log once per
    interval, with how many were seen."""
    state = {"last": 0.0, "seen": 0}
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        state["seen"] += 1
        now = time.monotonic()
        if now - state["last"] >= ACCEPT_LOG_INTERVAL_S:
            log.warning("accept() failed %d time(s): %s", state["seen"], context.get("exception"))
            state["last"], state["seen"] = now, 0

    loop.set_exception_handler(handler)


class Server(uvicorn.Server):
    """uvicorn.Server whose shutdown signal first marks the app draining, synchronously (so /readyz answers 503
    before uvicorn's next tick), and starts the drain deadline: `drain_s` later, requests not yet answering get 503."""

    def __init__(self, config: uvicorn.Config, state: Readiness, drain_s: float) -> None:
        super().__init__(config)
        self.state, self.drain_s = state, drain_s
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self.state.draining = True
            if self.loop is not None:  # a signal handler: hand the timer to the loop the thread-safe way
                self.loop.call_soon_threadsafe(self.state.drain, self.drain_s)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        install_accept_error_throttle(self.loop)
        await super().startup(sockets)
