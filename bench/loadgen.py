"""A lean closed-loop HTTP/1.1 load generator: N keep-alive connections, each sends its next request as soon as
the previous answer is read. Requests are pre-built bytes and answers are parsed just enough (status line,
Content-Length or chunked), so the client takes little CPU from the server on the same (2-core) machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

BOUNDARY = "maebenchboundary7f3a"


def multipart_request(host: str, port: int, path: str, name: str, data: bytes, ctype: str) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mae-bench\r\nAccept: */*\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def json_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mae-bench\r\nAccept: */*\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mae-bench\r\n\r\n".encode()


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes, dict[bytes, bytes]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**22)
        assert self.reader is not None
        self.writer.write(payload)
        status = int((await self.reader.readuntil(b"\r\n")).split()[1])
        headers: dict[bytes, bytes] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readuntil(b"\r\n")
            await self.reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, body, headers


async def fetch(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    c = Conn(host, port)
    try:
        status, body, _ = await asyncio.wait_for(c.request(get_request(host, port, path)), timeout)
        return status, body
    finally:
        await c.close()


@dataclass
class Record:
    start: float
    end: float
    status: int  # 0 = connection error / timeout
    nbytes: int


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    warmup_s: float = 0.0
    client_cpu_s: float = 0.0
    unfinished: int = 0
    probes: tuple[dict, dict] = ({}, {})


async def closed_loop(
    host: str,
    port: int,
    payloads: list[bytes],
    concurrency: int,
    *,
    warmup_s: float,
    duration_s: float,
    min_rounds: float = 6.0,
    max_window_s: float = 60.0,
    max_requests: int = 100_000,
    request_timeout_s: float = 300.0,
    probe: Callable[[], Awaitable[dict]] | None = None,
) -> LoadResult:
    """Run `concurrency` clients. Warm-up: at least warmup_s and one answer per client. Then a measured window of
    max(duration_s, min_rounds x the warm-up's median latency) seconds, capped at max_window_s (and at
    max_requests answers); answers that finish after the window are waited for but not counted. `probe` (server
    counters) is awaited at both ends of the window."""
    res = LoadResult()
    stop = asyncio.Event()
    done_per_client = [0] * concurrency
    enough = asyncio.Event()
    measured = 0

    async def client(i: int) -> None:
        nonlocal measured
        conn = Conn(host, port)
        k = i
        try:
            while not stop.is_set():
                payload = payloads[k % len(payloads)]
                k += concurrency
                t = time.perf_counter()
                try:
                    status, body, _ = await asyncio.wait_for(conn.request(payload), request_timeout_s)
                    n = len(body)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                    status, n = 0, 0
                    await conn.close()
                res.records.append(Record(t, time.perf_counter(), status, n))
                done_per_client[i] += 1
                if res.window[0] and res.records[-1].end >= res.window[0]:
                    measured += 1
                    if measured >= max_requests:
                        enough.set()
        finally:
            await conn.close()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    while time.perf_counter() - t0 < warmup_s or min(done_per_client) < 1:
        await asyncio.sleep(0.05)
        if time.perf_counter() - t0 > request_timeout_s:
            break
    lat = sorted(r.end - r.start for r in res.records if r.status == 200)
    typical = lat[len(lat) // 2] if lat else 0.0
    window = min(max_window_s, max(duration_s, min_rounds * typical))
    p0 = await probe() if probe else {}
    start = time.perf_counter()
    res.warmup_s = start - t0
    res.window = (start, start + window)
    cpu0 = time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), window)
    end = time.perf_counter()
    res.window = (start, end)
    res.client_cpu_s = time.process_time() - cpu0
    res.probes = (p0, await probe() if probe else {})
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=request_timeout_s)
    for t in pending:
        t.cancel()
    res.unfinished = len(pending)
    return res


def summarize(res: LoadResult) -> dict[str, float | int | dict[str, int]]:
    a, b = res.window
    inside = [r for r in res.records if a <= r.end <= b]
    ok = [r for r in inside if r.status == 200]
    lat = sorted((r.end - r.start) * 1e3 for r in ok)
    errors: dict[str, int] = {}
    for r in inside:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1

    def q(p: float) -> float:
        if not lat:
            return float("nan")
        k = (len(lat) - 1) * p / 100.0
        lo, hi = int(k), min(int(k) + 1, len(lat) - 1)
        return lat[lo] + (lat[hi] - lat[lo]) * (k - lo)

    span = b - a
    # Throughput: every successful request counts 1, spread evenly over its lifetime; the window gets the part
    # that overlaps it. Unlike "answers inside the window / window" this does not jump by a whole batch when a
    # batch of answers lands just inside or just outside the window, and it needs no think-time assumption.
    work = 0.0
    for r in res.records:
        if r.status == 200 and r.end > r.start:
            overlap = min(r.end, b) - max(r.start, a)
            if overlap > 0:
                work += overlap / (r.end - r.start)
    return {
        "window_s": span,
        "warmup_s": res.warmup_s,
        "completed": len(ok),
        "images_per_s": work / span if span > 0 else float("nan"),
        "answers_per_s_in_window": len(ok) / span if span > 0 else float("nan"),
        "latency_ms_p50": q(50),
        "latency_ms_p95": q(95),
        "latency_ms_p99": q(99),
        "latency_ms_max": lat[-1] if lat else float("nan"),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "mean_response_bytes": sum(r.nbytes for r in ok) / len(ok) if ok else 0,
        "client_cpu_pct": 100.0 * res.client_cpu_s / span if span > 0 else float("nan"),
        "unfinished": res.unfinished,
    }
