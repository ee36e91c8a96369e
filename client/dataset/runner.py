"""One embed-dataset run: read the source in order, keep the server's batches full, write the answers in order.

    source --(read + sha256, a worker thread)--> chunks of up to `batch` images --> Sender (<= `concurrency`
    requests in flight) --> answers, written to the Store in source order as the oldest chunk completes

At most `window` chunks (2 x concurrency) are held at once, read or in flight or answered and waiting for an older
one: memory stays bounded whatever the dataset's size (the index's paths and hashes aside, ~100 bytes an image).
Writing in source order is what makes a resumed run end as an uninterrupted one: the same index byte for byte,
the same embeddings (to float rounding: the server may batch an image with other companions).

Stopping: `stop` (the first Ctrl-C) ends the reading; requests in flight finish and are written, then the run ends
"interrupted". Cancelling the task (a second Ctrl-C) drops them; the output is consistent either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from client.dataset.send import Fatal, Outcome, Sender, batchable, error_text
from client.dataset.sources import Item, Source, open_source
from client.dataset.storage import ShardsSource, expand, needs_fsspec, public_uri
from client.dataset.store import Store
from client.vocabulary import check_options

DEFAULT_SHARD_SIZE = 10_000
_MULTIPART_OVERHEAD = 512  # bytes of multipart framing per image, on top of its bytes


@dataclass
class Options:
    src: str
    out: str
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    pool: str = "cls"
    dtype: str = "float32"
    mask_ratio: float = 0.0
    seed: int | None = None  # with mask_ratio > 0: one seeded mask for the whole run, default 0
    model: str | None = None
    resize: str = "squash"
    concurrency: int | None = None  # requests in flight; None: from the server's batch cap
    batch: int | None = None  # images per request; None: from the server's batch cap and request limit
    shard_size: int = DEFAULT_SHARD_SIZE
    max_retries: int = 10
    timeout_s: float = 300.0
    progress: bool = True

    def check(self) -> None:
        check_options(
            self.pool,
            self.dtype,
            self.resize,
            self.mask_ratio,
            {"concurrency": self.concurrency, "batch": self.batch, "shard_size": self.shard_size},
        )


@dataclass
class Summary:
    status: str  # complete | interrupted | failed
    images: int = 0  # source images met in this run
    skipped: int = 0  # already in the index (same path and sha256)
    embedded: int = 0
    errors: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0  # embedded / seconds
    requests: int = 0
    retries: int = 0
    resent: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    batch: int = 0
    concurrency: int = 0
    message: str = ""


def plan(model: dict[str, Any], limits: dict[str, Any], opts: Options) -> tuple[int, int]:
    """(images per request, requests in flight): enough images in flight for two of the server's batches (one
    computing, one forming), in requests of up to a batch, and never more than its queue holds (our own images
    alone then never get a 503). A server that does not say its limits gets one image per request, 8 at once."""
    cap = model.get("max_batch_size")
    per_request = limits.get("max_images_per_request")
    if cap is None or per_request is None:
        batch = opts.batch or 1
        return batch, opts.concurrency or max(1, 8 // batch)
    batch = min(opts.batch or cap, per_request)
    concurrency = opts.concurrency or max(2, math.ceil(2 * cap / batch))
    if opts.concurrency is None and "max_queue" in limits:
        concurrency = max(1, min(concurrency, limits["max_queue"] // batch))
    return batch, concurrency


async def server_info(http: httpx.AsyncClient, name: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's /v1/models entry, the server's limits)."""
    try:
        r = await http.get("/v1/models")
    except httpx.TransportError as e:
        raise Fatal(f"cannot reach {http.base_url}: {e}") from None
    if r.status_code != 200:
        raise Fatal(f"GET /v1/models: {error_text(r)}")
    info = r.json()
    want = name or info["default"]
    for m in info["models"]:
        if m["name"] == want:
            return m, info.get("limits") or {}
    raise Fatal(f"the server has no model {want!r}; it has {', '.join(m['name'] for m in info['models'])}")


def _chunks(items: Iterator[Item], batch: int, max_bytes: int) -> Generator[list[Item], None, None]:
    """Consecutive items in requests of up to `batch` images and `max_bytes`; an item not to send (error) or not
    batchable goes alone."""
    chunk: list[Item] = []
    size = 0
    for item in items:
        alone = item.data is None or not batchable(item.data)
        cost = (len(item.data) if item.data is not None else 0) + _MULTIPART_OVERHEAD
        if chunk and (alone or len(chunk) == batch or size + cost > max_bytes):
            yield chunk
            chunk, size = [], 0
        if alone:
            yield [item]
            continue
        chunk.append(item)
        size += cost
    if chunk:
        yield chunk


async def _no_request(item: Item) -> list[Outcome]:
    return [Outcome(error=item.error)]


async def run(
    opts: Options, stop: asyncio.Event | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> Summary:
    """Embed opts.src into opts.out; see the module's docstring. Raises Fatal or StoreError when it cannot start.
    `transport`: httpx's, for tests that stand in for the server."""
    opts.check()
    stop = stop or asyncio.Event()
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    limits_http = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    timeout = httpx.Timeout(opts.timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=opts.url, headers=headers, timeout=timeout, limits=limits_http, transport=transport
    ) as http:
        model, limits = await server_info(http, opts.model)
        batch, concurrency = plan(model, limits, opts)
        max_body = limits.get("max_body_bytes", 20 * 1024 * 1024)
        seed = opts.seed if opts.seed is not None or opts.mask_ratio == 0 else 0
        parameters = {"pool": opts.pool, "dtype": opts.dtype, "mask_ratio": opts.mask_ratio, "seed": seed,
                      "resize": opts.resize, "shard_size": opts.shard_size}  # fmt: skip
        identity = {
            "model": {k: model.get(k) for k in ("name", "architecture", "weights_sha256", "embed_dim", "image_size",
                                                 "patch_size", "grid", "family")},
            "parameters": parameters,
        }  # fmt: skip
        source = _source(opts.src, max_body - _MULTIPART_OVERHEAD)
        where = public_uri(opts.src) if needs_fsspec(opts.src) else str(Path(opts.src).resolve())
        extra = {"source": {"path": where, "kind": source.kind}, "server": opts.url,
                 "status": "running"}  # fmt: skip
        store = Store.open(Path(opts.out), identity, extra)
        query = {"pool": opts.pool, "dtype": opts.dtype, "mask_ratio": str(opts.mask_ratio), "model": model["name"],
                 "resize": opts.resize, **({"seed": str(seed)} if seed is not None else {})}  # fmt: skip
        sender = Sender(http, query, concurrency=concurrency, max_retries=opts.max_retries)
        summary = Summary(status="running", batch=batch, concurrency=concurrency)
        print(
            f"mae-client: {model['name']} ({model.get('architecture')}, {model.get('device')}); {batch} image(s) a "
            f"request, {concurrency} request(s) in flight (server batch cap {model.get('max_batch_size', '?')})",
            file=sys.stderr,
        )
        bar = tqdm(unit="img", disable=not opts.progress, dynamic_ncols=True, smoothing=0.1)
        _count_in_background(source, bar, asyncio.get_running_loop())
        pending: deque[tuple[list[Item], asyncio.Task[list[Outcome]]]] = deque()
        window = 2 * concurrency

        def write_head(outcomes: list[Outcome]) -> None:
            items, _ = pending.popleft()
            for item, o in zip(items, outcomes, strict=True):
                if o.arrays is not None:
                    store.add_ok(item.path, item.sha256, o.arrays)
                    summary.embedded += 1
                else:
                    store.add_error(item.path, item.sha256, o.error or "unknown error")
                    summary.errors += 1
            store.commit()
            bar.update(len(items))
            bar.set_postfix(errors=summary.errors, retries=sender.stats.retries, refresh=False)

        async def drain(until: int) -> None:
            """Write completed chunks, oldest first; wait for the oldest while more than `until` are held."""
            while pending and (len(pending) > until or pending[0][1].done()):
                write_head(await pending[0][1])

        def on_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                stop.set()  # a Fatal: read no further (it is raised when its chunk is the oldest)

        chunks = _chunks(_unseen(iter(source), store.done, summary, bar), batch, max_body)
        exhausted = False
        try:
            while not stop.is_set():
                chunk = await asyncio.to_thread(next, chunks, None)  # file reads and hashing off the event loop
                if chunk is None:
                    exhausted = True
                    break
                await drain(until=window - 1)
                if chunk[0].data is None:
                    task = asyncio.create_task(_no_request(chunk[0]))
                else:
                    task = asyncio.create_task(sender.send(chunk))
                task.add_done_callback(on_done)
                pending.append((chunk, task))
            await drain(until=0)
            summary.status = "complete" if exhausted else "interrupted"
        except Fatal as e:
            summary.status, summary.message = "failed", str(e)
        except asyncio.CancelledError:
            summary.status = "interrupted"
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            for _, task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
            bar.close()
            summary.seconds = time.monotonic() - t0
            summary.images_per_s = summary.embedded / summary.seconds if summary.seconds else 0.0
            st = sender.stats
            summary.requests, summary.retries, summary.resent = st.requests, st.retries, st.resent
            summary.refused = {str(k): v for k, v in st.refused.items()}
            store.manifest["status"] = summary.status
            store.manifest["runs"].append(
                {"started": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"), **asdict(summary)}
            )
            store.manifest["timing"] = _timing(store.manifest["runs"])
            store.close()
            with contextlib.suppress(ValueError):  # closes an open tar; "already executing" if a read is under way
                chunks.close()
        return summary


def _source(src: str, max_bytes: int) -> Source:
    """A local folder, list or tar as before; anything else (a URI, a glob, a brace range, a parquet) through
    fsspec (client.dataset.storage), its images indexed by URI."""
    if needs_fsspec(src):
        return ShardsSource(expand(src), max_bytes)
    return open_source(src, max_bytes=max_bytes)


def _count_in_background(source: Source, bar: tqdm, loop: asyncio.AbstractEventLoop) -> None:
    """The bar's total, counted in a daemon thread: embedding starts at once, and a walk over a million files
    neither delays it nor holds up the exit."""

    def count() -> None:
        with contextlib.suppress(Exception):  # a source that cannot be walked twice, a loop already closed
            n = source.count()

            def show() -> None:
                bar.total = n
                bar.refresh()

            loop.call_soon_threadsafe(show)

    threading.Thread(target=count, name="mae-count", daemon=True).start()


def _unseen(items: Iterator[Item], done: dict[str, str], summary: Summary, bar: tqdm) -> Iterator[Item]:
    """The items the index does not hold yet (same path and same sha256 = held: skipped). Runs in a worker thread;
    marks each as taken, so a path listed twice is embedded once."""
    for item in items:
        summary.images += 1
        if done.get(item.path) == item.sha256:
            summary.skipped += 1
            bar.update(1)
            continue
        done[item.path] = item.sha256
        yield item


def _timing(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in runs)
    embedded = sum(r["embedded"] for r in runs)
    return {
        "first_started": runs[0]["started"],
        "last_finished": runs[-1]["finished"],
        "seconds": round(seconds, 3),
        "embedded": embedded,
        "images_per_s": round(embedded / seconds, 3) if seconds else 0.0,
    }


def embed_dataset(src: str | Path, out: str | Path, **options: Any) -> Summary:
    """Blocking form of `run`, for Python callers: embed_dataset("photos/", "emb/", url=..., pool="mean")."""
    return asyncio.run(run(Options(src=str(src), out=str(out), **options)))
