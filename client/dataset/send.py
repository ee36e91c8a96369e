"""Sending images to POST /v1/embed for a dataset run: several per request, binary (npz) answers, retries.

What each answer means for the run:
- 200: an npz whose arrays stack the request's images on a first axis;
- 503 / 504 / 502 / 429, a connection error or timeout: the server is busy or away. Retried with jittered
  exponential backoff, never sooner than its Retry-After; after `max_retries` the run stops (resumable);
- 400 / 413 / 415 / 500 for a request of several images: binary answers are all or nothing, so one bad image
  fails its companions. They are sent again one by one, and each image's own answer is what is recorded;
- the same for a single image: that image's error, recorded in the index; the run goes on;
- 401, 403, 404, 422 (a parameter, the model, the API key, the URL): no image can succeed, the run stops.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from client.dataset.sources import Item
from client.vocabulary import media_type, sniff_format

RETRY_STATUSES = frozenset({429, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404, 405, 422})


class Fatal(RuntimeError):
    """No further image can succeed (or the server stayed away): the run stops, resumable."""


class Unavailable(Fatal):
    """Retries ran out on 503 / 504 / connection errors."""


def batchable(data: bytes) -> bool:
    """Bytes that look like an image the server takes (PNG, JPEG, WebP). Anything else is sent alone, so that its
    refusal cannot fail a whole request of good images; the server still decides."""
    return sniff_format(data) is not None


def retry_after_s(r: httpx.Response | None) -> float:
    """Retry-After in seconds (the delta-seconds form mae-serve sends); 0 when absent or an HTTP date."""
    if r is None:
        return 0.0
    try:
        return max(0.0, min(float(r.headers.get("retry-after", "0")), 300.0))
    except ValueError:
        return 0.0


def backoff_s(attempt: int, retry_after: float, rng: random.Random, base: float = 0.25, cap: float = 30.0) -> float:
    """How long to wait before retry `attempt` (0 = the first): never less than Retry-After, plus a random part
    that doubles each time (up to `cap`), so that clients refused together do not all come back together."""
    b = min(cap, base * 2**attempt)
    return max(retry_after, b) + rng.uniform(0, b)


def error_text(r: httpx.Response) -> str:
    """'415 unsupported_type: unsupported image type: ...' from mae-serve's one error shape (or the raw body)."""
    try:
        err = r.json()["error"]
        return f"{err['status']} {err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} http_error: {r.text[:200]}"


@dataclass
class Outcome:
    """One image's answer: its arrays (one row each, no leading axis) or the error to record."""

    arrays: dict[str, np.ndarray] | None = None
    error: str | None = None


@dataclass
class SendStats:
    requests: int = 0
    retries: int = 0
    resent: int = 0  # images sent again alone after a request of several failed, and embedded then
    refused: dict[int, int] = field(default_factory=dict)  # retried statuses (0 = connection error) -> count


class Sender:
    """POSTs items to /v1/embed (format=npz) with the run's parameters, at most `concurrency` requests at once."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        params: dict[str, str],
        *,
        concurrency: int,
        max_retries: int = 10,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.http, self.params, self.max_retries = http, {**params, "format": "npz"}, max_retries
        self.slots = asyncio.Semaphore(concurrency)
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.stats = SendStats()

    async def send(self, items: list[Item]) -> list[Outcome]:
        """An Outcome per item, in order. Raises Fatal when the run cannot go on."""
        r = await self._post(items)
        if r.status_code == 200:
            return self._parse(r, len(items))
        if r.status_code in FATAL_STATUSES or (
            r.status_code == 413 and len(items) == 1 and _code(r) == "too_many_images"
        ):
            raise Fatal(f"the server refused the request: {error_text(r)}")
        if len(items) == 1:
            return [Outcome(error=error_text(r))]
        # One by one (still concurrently, within the same request slots): each image gets its own answer.
        singles = await asyncio.gather(*(self.send([item]) for item in items))
        outcomes = [o for one in singles for o in one]
        self.stats.resent += sum(o.arrays is not None for o in outcomes)
        return outcomes

    async def _post(self, items: list[Item]) -> httpx.Response:
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        for item in items:
            assert item.data is not None, "only items with bytes are sent"
            files.append(("image", (item.path.rsplit("/", 1)[-1], item.data, media_type(item.path))))
        for attempt in range(self.max_retries + 1):
            r: httpx.Response | None = None
            async with self.slots:
                self.stats.requests += 1
                try:
                    r = await self.http.post("/v1/embed", params=self.params, files=files)
                    if r.status_code not in RETRY_STATUSES:
                        return r
                    why = error_text(r)
                except httpx.TransportError as e:  # refused, reset, timed out: the answer may never come
                    why = f"{type(e).__name__}: {e}"
            status = r.status_code if r is not None else 0
            self.stats.refused[status] = self.stats.refused.get(status, 0) + 1
            if attempt == self.max_retries:
                break
            self.stats.retries += 1
            await self.sleep(backoff_s(attempt, retry_after_s(r), self.rng))
        raise Unavailable(f"gave up after {self.max_retries} retries: {why}")

    @staticmethod
    def _parse(r: httpx.Response, n: int) -> list[Outcome]:
        try:
            with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "grid"}  # grid: the same for every image (manifest)
        except (ValueError, OSError, EOFError) as e:
            raise Fatal(f"the server's answer is not an npz: {e}") from None
        if n == 1:  # a single image's arrays come without the leading axis
            arrays = {k: a[None] for k, a in arrays.items()}
        if not arrays or any(a.shape[0] != n for a in arrays.values()):
            raise Fatal(f"the server answered { ({k: a.shape for k, a in arrays.items()}) } for {n} images")
        return [Outcome(arrays={k: a[i] for k, a in arrays.items()}) for i in range(n)]


def _code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
