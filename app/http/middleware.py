"""ASGI middleware: the life of one HTTP request, outside the routes.

- `Lifecycle`: admission (the concurrency limit), accounting (requests by route and status, latency), and
  cancellation: a request whose client went away is cancelled (status 499, as nginx counts it), and on shutdown a
  request still unanswered at the drain deadline is answered 503 in the one error shape.
- `BodyGuard`: the body's size cap (from Content-Length at once, else counted while reading) and its time limit.

Cancelling a request cancels whatever it awaits: its queued images are dropped before compute (app.serving.engine).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import APIError
from app.serving import metrics

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
FRAMING_ERROR = "mae.framing_error"  # scope key set by app.http.server when uvicorn answered 400 to a broken body


class _Request:
    __slots__ = ("task", "started", "reason", "counted")

    def __init__(self, task: asyncio.Task[None], counted: bool) -> None:
        self.task, self.started, self.counted = task, False, counted
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Cancel the request unless its answer has begun (an answer in progress is finished, not cut)."""
        if not self.started and self.reason is None:
            self.reason = reason
            self.task.cancel(msg=reason)  # the message travels to the futures it awaits (engine: why dropped)


class InFlight:
    """The requests being served, shared by the middleware and the shutdown signal handler."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.requests: set[_Request] = set()
        self.counted = 0
        self.expired = False  # the drain deadline has passed: whatever is left is answered 503

    def drain(self, budget_s: float) -> None:
        """On the event loop: at `budget_s` from now, cancel every request not yet answering."""
        asyncio.get_running_loop().call_later(budget_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for r in list(self.requests):
            r.cancel("drain")


class Lifecycle:
    """See the module docstring. `exempt`: paths outside the concurrency limit (probes, metrics)."""

    def __init__(self, app: ASGIApp, inflight: InFlight, retry_after_s: int, exempt: Iterable[str] = ()) -> None:
        self.app, self.inflight, self.retry_after = app, inflight, {"Retry-After": str(retry_after_s)}
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        inflight = self.inflight
        counted = scope["path"] not in self.exempt
        refusal = None
        if inflight.expired:
            refusal = APIError(503, "overloaded", "the server is shutting down", {**self.retry_after})
        elif counted and inflight.counted >= inflight.limit:
            metrics.REJECTS.labels("concurrency").inc()
            refusal = APIError(503, "overloaded", f"{inflight.limit} requests in progress", {**self.retry_after})
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            metrics.REQUESTS.labels("unmatched", "503").inc()
            return

        task = asyncio.current_task()
        assert task is not None
        req = _Request(task, counted)
        inflight.requests.add(req)
        inflight.counted += counted
        watcher: asyncio.Task | None = None

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            req.cancel("client_closed")

        async def receive_and_watch() -> Message:
            nonlocal watcher
            msg = await receive()
            if watcher is None and msg["type"] == "http.request" and not msg.get("more_body", False):
                # The body is in: from now on the only message left is the disconnect, and the route no longer
                # reads. Watch for it, so work for a client that is gone is dropped.
                watcher = asyncio.get_running_loop().create_task(watch_disconnect())
            return msg

        async def send_and_note(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status, req.started = msg["status"], True
            await send(msg)

        try:
            await self.app(scope, receive_and_watch, send_and_note)
        except asyncio.CancelledError:
            if req.reason is None:
                raise  # not ours (the server's own shutdown): let it go on
            task.uncancel()
            if req.reason == "drain" and not req.started:
                err = APIError(503, "overloaded", "the server shut down before this request was answered")
                err.headers.update(self.retry_after, Connection="close")
                await err.response()(scope, receive, send)
                status = 503
            else:
                status = CLIENT_CLOSED
        except ClientDisconnect:  # the body stopped coming: the client left, or uvicorn refused its framing (400)
            status = 400 if scope.get(FRAMING_ERROR) else CLIENT_CLOSED
        finally:
            if watcher is not None:
                watcher.cancel()
            inflight.requests.discard(req)
            inflight.counted -= counted
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - start)


class BodyGuard:
    """Refuse bodies over `max_bytes` (413) and bodies that take longer than `timeout_s` to arrive (408).

    Both answers close the connection: otherwise uvicorn would read (and discard) the rest of the body, however long
    or slow, to keep the connection alive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    err = APIError(413, "body_too_large", f"request body over {self.max_bytes} bytes")
                    err.headers["Connection"] = "close"
                    return await err.response()(scope, receive, send)
        seen, done = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def guarded() -> Message:
            nonlocal seen, done
            if done:  # after the body: only the disconnect is left to wait for, however long
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                why = f"the request body did not arrive within {self.timeout_s:g} s"
                raise APIError(408, "request_timeout", why, {"Connection": "close"}) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                done = not msg.get("more_body", False)
                if seen > self.max_bytes:
                    why = f"request body over {self.max_bytes} bytes"
                    raise APIError(413, "body_too_large", why, {"Connection": "close"})
            return msg

        await self.app(scope, guarded, send)


class ErrorShape:
    """Error answers in another protocol's shape on its paths: the service's one error body, {"error": {"status",
    "code", "message"}}, whoever answered (a route, auth, the body or concurrency limit, a 404 or 405), is held until
    complete and rewritten by `shape`. A front-end with an error shape of its own (v2, OpenAI) says which paths
    (`applies`) and what shape; any other answer passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def applies(self, path: str) -> bool:
        raise NotImplementedError

    def shape(self, error: dict[str, Any], status: int) -> Any:
        raise NotImplementedError

    def reshaped(self, body: bytes, status: int) -> bytes:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return body
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return body
        return json.dumps(self.shape(error, status)).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.applies(scope.get("path", "")):
            return await self.app(scope, receive, send)
        start: Message | None = None
        parts: list[bytes] = []

        async def reshape(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                ctype = dict(msg.get("headers", [])).get(b"content-type", b"")
                if msg["status"] >= 400 and ctype.startswith(b"application/json"):
                    start = msg  # held until the whole (small) error body is in
                    return
            elif msg["type"] == "http.response.body" and start is not None:
                parts.append(msg.get("body", b""))
                if msg.get("more_body", False):
                    return
                body = self.reshaped(b"".join(parts), start["status"])
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                start = None
                return
            await send(msg)

        await self.app(scope, receive, reshape)
