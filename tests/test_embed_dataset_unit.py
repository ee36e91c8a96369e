"""embed-dataset without a server: sources, the store's crash safety, the loaders, retries and the run's window,
against a stand-in server (httpx.MockTransport) whose embeddings are a function of the image bytes."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import io
import json
import random
import tarfile

import httpx
import numpy as np
import pytest

from client.dataset import load_embeddings, load_index
from client.dataset import runner as runner_mod
from client.dataset import sources as sources_mod
from client.dataset.runner import Options, plan, run
from client.dataset.send import Fatal, Sender, Unavailable, backoff_s
from client.dataset.sources import Item, open_source
from client.dataset.store import INDEX, ShardedArray, Store, StoreError, shard_file

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_png(i: int) -> bytes:
    return PNG_MAGIC + f"image {i}".encode()


def fake_cls(data: bytes) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(data).digest()[:16], dtype=np.float32).copy()


def images_of(request: httpx.Request) -> list[bytes]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.content)
    return [part.get_payload(decode=True) for part in msg.iter_parts()]


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class FakeServer:
    """/v1/models and /v1/embed?format=npz&pool=cls like mae-serve's: stacked answers, all or nothing (an image
    starting b'BAD' fails its whole request with 400), `fail` = statuses to answer first, `delay` per request."""

    def __init__(
        self, delay: float = 0.0, fail: list[int | str] | None = None, max_batch: int = 4, retry_after: str = "2"
    ) -> None:
        self.delay, self.fail, self.max_batch, self.retry_after = delay, list(fail or []), max_batch, retry_after
        self.in_flight = self.max_in_flight = 0
        self.embedded: list[bytes] = []
        self.requests: list[int] = []  # images per embed request

    api_key: str | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json=error(401, "unauthorized"))
        if request.url.path == "/v1/models":
            model = {"name": "fake", "architecture": "fake", "weights_sha256": "ab" * 32, "embed_dim": 4,
                     "image_size": 32, "patch_size": 8, "grid": [4, 4], "family": "mae", "device": "cpu",
                     "max_batch_size": self.max_batch}  # fmt: skip
            limits = {"max_images_per_request": 16, "max_queue": 64, "max_body_bytes": 1 << 20}
            return httpx.Response(200, json={"default": "fake", "models": [model], "limits": limits})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                what = self.fail.pop(0)
                if what == "connect":
                    raise httpx.ConnectError("connection refused")
                return httpx.Response(
                    int(what), headers={"Retry-After": self.retry_after}, json=error(int(what), "overloaded")
                )
            images = images_of(request)
            self.requests.append(len(images))
            if any(b.startswith(b"BAD") for b in images):
                return httpx.Response(400, json=error(400, "undecodable"))
            if request.url.params["pool"] != "cls":
                return httpx.Response(422, json=error(422, "bad_parameter"))
            self.embedded += images
            cls = np.stack([fake_cls(b) for b in images])
            return httpx.Response(
                200, content=npz({"cls": cls[0] if len(images) == 1 else cls, "grid": np.array([4, 4])})
            )
        finally:
            self.in_flight -= 1


def error(status: int, code: str) -> dict:
    return {"error": {"status": status, "code": code, "message": f"{code} (fake)"}}


def sender_for(server: FakeServer, sleeps: list[float], **kw) -> tuple[Sender, httpx.AsyncClient]:
    http = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(server))

    async def sleep(s: float) -> None:
        sleeps.append(s)

    return Sender(http, {"pool": "cls"}, concurrency=2, sleep=sleep, rng=random.Random(0), **kw), http


def items(n: int, bad: set[int] = frozenset()) -> list[Item]:
    out = []
    for i in range(n):
        data = b"BAD" + PNG_MAGIC if i in bad else fake_png(i)
        out.append(Item(f"{i}.png", hashlib.sha256(data).hexdigest(), data))
    return out


# ---------------------------------------------------------------------------------------------- retries
def test_backoff_never_before_retry_after_doubles_and_jitters():
    rng = random.Random(1)
    waits = [backoff_s(a, 2.0, rng) for a in range(12)]
    assert all(w >= 2.0 for w in waits)
    assert len(set(waits)) == len(waits)  # jittered: no two alike
    assert backoff_s(0, 0, rng) <= 0.5 and 30 <= backoff_s(20, 0, rng) <= 60  # 0.25 s doubling, capped at 30 s


def test_503_504_and_connection_errors_are_retried_after_retry_after():
    server, sleeps = FakeServer(fail=[503, "connect", 504]), []

    async def go():
        s, http = sender_for(server, sleeps)
        async with http:
            return await s.send(items(3)), s.stats

    outcomes, stats = asyncio.run(go())
    assert [o.arrays["cls"].tolist() for o in outcomes] == [fake_cls(it.data).tolist() for it in items(3)]
    assert stats.retries == 3 and stats.refused == {503: 1, 0: 1, 504: 1}
    assert sleeps[0] >= 2.0 and sleeps[2] >= 2.0  # Retry-After: 2 honoured
    assert sleeps[1] < 2.0  # a connection error has no Retry-After: backoff only


def test_retries_run_out_the_run_stops():
    server, sleeps = FakeServer(fail=[503] * 4), []

    async def go():
        s, http = sender_for(server, sleeps, max_retries=3)
        async with http:
            await s.send(items(2))

    with pytest.raises(Unavailable, match="gave up after 3 retries: 503 overloaded"):
        asyncio.run(go())
    assert len(sleeps) == 3


def test_one_bad_image_fails_its_request_then_each_is_sent_alone():
    server, sleeps = FakeServer(), []

    async def go():
        s, http = sender_for(server, sleeps)
        async with http:
            return await s.send(items(4, bad={2})), s.stats

    outcomes, stats = asyncio.run(go())
    assert [o.error for o in outcomes] == [None, None, "400 undecodable: undecodable (fake)", None]
    assert [o.arrays is not None for o in outcomes] == [True, True, False, True]
    assert server.requests == [4, 1, 1, 1, 1]  # the request of 4 failed as a whole; then one by one
    assert stats.resent == 3 and not sleeps


def test_a_parameter_the_server_refuses_stops_the_run():
    server = FakeServer()

    async def go():
        http = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(server))
        async with http:
            await Sender(http, {"pool": "all"}, concurrency=1).send(items(2))

    with pytest.raises(Fatal, match="422 bad_parameter"):
        asyncio.run(go())


def test_plan_fills_two_batches_within_the_queue_and_the_request_limit():
    o = Options(src="", out="")
    assert plan({"max_batch_size": 4}, {"max_images_per_request": 16, "max_queue": 256}, o) == (4, 2)
    assert plan({"max_batch_size": 32}, {"max_images_per_request": 16, "max_queue": 256}, o) == (16, 4)
    assert plan({"max_batch_size": 32}, {"max_images_per_request": 16, "max_queue": 20}, o) == (16, 1)
    assert plan({}, {}, o) == (1, 8)  # a server that does not say
    assert plan({"max_batch_size": 4}, {"max_images_per_request": 2}, Options("", "", batch=8, concurrency=3)) == (2, 3)


# ---------------------------------------------------------------------------------------------- the run
def write_folder(root, n: int, bad: set[int] = frozenset()) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        rel = f"d{i % 3}/img{i:04d}.png"
        data = b"BAD" + PNG_MAGIC if i in bad else fake_png(i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    (root / "d0" / "readme.txt").write_text("not an image")
    return dict(sorted(files.items()))


def test_run_in_source_order_window_bounded_resumable(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    files = write_folder(src, 90, bad={7, 40})
    server = FakeServer(delay=0.002)
    read, written, held = [0], [0], []
    real_iter, real_commit = sources_mod.FolderSource.__iter__, Store.commit

    def counting_iter(self):
        for item in real_iter(self):  # each item is read from disk as it is yielded
            read[0] += 1
            held.append(read[0] - written[0])
            yield item

    def counting_commit(self):
        written[0] = self.n_ok + self.n_error
        return real_commit(self)

    monkeypatch.setattr(sources_mod.FolderSource, "__iter__", counting_iter)
    monkeypatch.setattr(Store, "commit", counting_commit)
    opts = Options(src=str(src), out=str(out), url="http://fake", progress=False, shard_size=16)
    s = asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    assert (s.status, s.embedded, s.errors, s.batch, s.concurrency) == ("complete", 88, 2, 4, 2)
    assert server.max_in_flight <= 2
    # held in memory at once: 2 x concurrency chunks of `batch` images, the next chunk and the image after it
    assert max(held) <= (2 * 2 + 1) * 4 + 1, max(held)
    index = load_index(out)
    assert index["path"] == list(files)  # source order (sorted, recursive), errors in place
    assert index["status"].count("error") == 2 and (index["shard"] == -1).sum() == 2
    cls, ok = load_embeddings(out)
    assert len(cls.shards) == 6 and cls.shape == (88, 4) and len(ok["path"]) == 88
    assert ok["sha256"] == [hashlib.sha256(files[p]).hexdigest() for p in ok["path"]]
    np.testing.assert_array_equal(ok["shard"] * 16 + ok["row"], np.arange(88))
    np.testing.assert_array_equal(np.asarray(cls), np.stack([fake_cls(files[p]) for p in ok["path"]]))
    assert s.resent == len(server.embedded) - 88  # the good companions of the two bad images, sent twice

    before = len(server.embedded)  # run again: nothing to do
    s2 = asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    assert (s2.skipped, s2.embedded, len(server.embedded)) == (90, 0, before)

    changed = "d1/img0004.png"  # a file that changed since: embedded again, under its new sha256
    (src / changed).write_bytes(fake_png(1000))
    s3 = asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    assert (s3.skipped, s3.embedded) == (89, 1)
    index = load_index(out)
    assert index["path"][-1] == changed and index["sha256"][-1] == hashlib.sha256(fake_png(1000)).hexdigest()
    cls, ok = load_embeddings(out)
    np.testing.assert_array_equal(cls[-1], fake_cls(fake_png(1000)))

    with pytest.raises(StoreError, match="holds a run with parameters"):  # another setting: refused
        asyncio.run(run(Options(src=str(src), out=str(out), url="http://fake", pool="mean", progress=False),
                        transport=httpx.MockTransport(server)))  # fmt: skip


def test_a_fatal_answer_ends_the_run_failed_and_resumable(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, 20)
    server = FakeServer(fail=[503] * 3, retry_after="0")
    opts = Options(src=str(src), out=str(out), url="http://fake", progress=False, max_retries=1, concurrency=1)
    s = asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    assert s.status == "failed" and "gave up after 1 retries" in s.message
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    s = asyncio.run(run(opts, transport=httpx.MockTransport(server)))  # the server is back
    assert (s.status, s.embedded + s.skipped) == ("complete", 20)


# ---------------------------------------------------------------------------------------------- the store
IDENTITY = {"model": {"name": "m", "weights_sha256": "00"}, "parameters": {"pool": "all", "shard_size": 4}}


def test_store_cuts_what_lies_past_the_last_complete_index_line(tmp_path):
    out = tmp_path / "out"
    st = Store.open(out, IDENTITY, {})
    rng = np.random.default_rng(0)
    f16 = np.float16
    rows = [
        {"cls": rng.standard_normal(3).astype(f16), "patches": rng.standard_normal((2, 3)).astype(f16)}
        for _ in range(7)
    ]
    for i, r in enumerate(rows[:6]):
        st.add_ok(f"p{i}", f"s{i}", r)
    st.add_error("bad", "sx", "415 unsupported_type: no")
    st.close()
    # What a run killed mid-write leaves: rows appended past the index, a torn index line, a shard begun.
    for key in ("cls", "patches"):
        with open(shard_file(out, key, 1), "ab") as f:
            f.write(rows[6][key].tobytes())
        shard_file(out, key, 2).write_bytes(b"\x93NUMPY partial")
    with open(out / INDEX, "a") as f:
        f.write("p6,s6,1,2,o")
    st = Store.open(out, IDENTITY, {})
    assert (st.n_ok, st.n_error) == (6, 1) and not shard_file(out, "cls", 2).exists()
    assert (out / INDEX).read_bytes().endswith(b"no\n")
    st.add_ok("p6", "s6", rows[6])
    st.close()
    cls, ok = load_embeddings(out)
    patches, _ = load_embeddings(out, "patches")
    assert ok["path"] == [f"p{i}" for i in range(7)] and ok["row"].tolist() == [0, 1, 2, 3, 0, 1, 2]
    np.testing.assert_array_equal(np.asarray(cls), np.stack([r["cls"] for r in rows]))
    np.testing.assert_array_equal(patches[2:5], np.stack([r["patches"] for r in rows[2:5]]))
    assert np.load(shard_file(out, "cls", 1)).shape == (3, 3)  # a plain .npy


def test_store_refuses_damage_foreign_folders_and_a_second_writer(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        Store.open(tmp_path / "other", IDENTITY, {})
    out = tmp_path / "out"
    st = Store.open(out, IDENTITY, {})
    with pytest.raises(StoreError, match="another run is writing"):
        Store.open(out, IDENTITY, {})
    for i in range(5):
        st.add_ok(f"p{i}", "s", {"cls": np.zeros(3, np.float32)})
    st.close()
    with open(shard_file(out, "cls", 1), "r+b") as f:
        f.truncate(128 + 2)  # the one row the index points at there is gone
    with pytest.raises(StoreError, match="shorter than the index"):
        Store.open(out, IDENTITY, {})
    shard_file(out, "cls", 1).write_bytes(b"\x93NUMPY\x01\x00\x10")
    with pytest.raises(StoreError, match="not a readable .npy"):
        Store.open(out, IDENTITY, {})
    shard_file(out, "cls", 1).unlink()
    with pytest.raises(StoreError, match="missing"):
        Store.open(out, IDENTITY, {})


def test_sharded_array_indexes_like_one_array(tmp_path):
    full = np.arange(40, dtype=np.float32).reshape(10, 4)
    parts = [full[0:4], full[4:8], full[8:10]]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p)
    a = ShardedArray([np.load(tmp_path / f"{i}.npy", mmap_mode="r") for i in range(3)])
    assert a.shape == (10, 4) and len(a) == 10 and a.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), full)
    for key in (3, 4, -1, slice(2, 9), slice(None, None, 3), [9, 0, 5], np.arange(10) % 2 == 0, (slice(1, 6), 2),
                (7, slice(1, 3))):  # fmt: skip
        np.testing.assert_array_equal(a[key], full[key], err_msg=str(key))
    with pytest.raises(IndexError):
        a[10]


# ---------------------------------------------------------------------------------------------- sources
def test_sources_folder_list_and_tar(tmp_path):
    files = write_folder(tmp_path / "f", 6)
    (tmp_path / "f" / "big.png").write_bytes(PNG_MAGIC + b"x" * 5000)
    src = open_source(tmp_path / "f", max_bytes=4000)
    got = list(src)
    assert src.kind == "folder" and src.count() == 7
    assert [i.path for i in got] == ["big.png", *files]  # sorted: top-level files, then each folder
    big = got[0]
    assert big.data is None and big.error.startswith("413 body_too_large") and len(big.sha256) == 64

    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\nf/d0/img0000.png\n\n{tmp_path / 'f/d1/img0001.png'}\nmissing.png\n")
    got = list(open_source(lst))
    assert [(i.path, i.data is not None) for i in got] == [
        ("f/d0/img0000.png", True), (str(tmp_path / "f/d1/img0001.png"), True), ("missing.png", False)]  # fmt: skip
    assert got[2].error.startswith("unreadable") and got[2].sha256 == ""

    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for key, data in [("a", fake_png(1)), ("b", fake_png(2))]:
            for name, payload in [(f"{key}.png", data), (f"{key}.cls", b"3"), (f"{key}.json", b"{}")]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    src = open_source(tar)
    assert src.kind == "tar" and src.count() == 2
    assert [(i.path, i.data) for i in src] == [("a.png", fake_png(1)), ("b.png", fake_png(2))]


def test_chunks_keep_order_and_send_the_unbatchable_alone():
    its = [*items(5), Item("x.gif", "s", b"GIF89a"), *items(3)]
    chunks = list(runner_mod._chunks(iter(its), batch=2, max_bytes=10_000))
    assert [[i.path for i in c] for c in chunks] == [["0.png", "1.png"], ["2.png", "3.png"], ["4.png"], ["x.gif"],
                                                      ["0.png", "1.png"], ["2.png"]]  # fmt: skip
    tight = list(runner_mod._chunks(iter(items(4)), batch=4, max_bytes=2 * (512 + 20)))
    assert [len(c) for c in tight] == [2, 2]  # the body limit splits too


def test_index_paths_with_commas_quotes_and_newlines_and_a_torn_quoted_record(tmp_path):
    out = tmp_path / "out"
    st = Store.open(out, IDENTITY, {})
    odd = ["a,b.png", 'say "cheese".jpg', "two\nlines.png", "naïve ✓.webp"]
    for p in odd:
        st.add_ok(p, "s", {"cls": np.zeros(2, np.float32)})
    st.close()
    with open(out / INDEX, "a") as f:
        f.write('"torn\nin the middle of a quoted path')  # killed inside a quoted field that holds a newline
    st = Store.open(out, IDENTITY, {})
    st.close()
    assert load_index(out)["path"] == odd
    assert (out / INDEX).read_text().endswith("ok,\n")


def test_the_api_key_goes_with_every_request(tmp_path):
    src = tmp_path / "src"
    write_folder(src, 6)
    server = FakeServer()
    server.api_key = "k3y"
    opts = Options(src=str(src), out=str(tmp_path / "out"), url="http://fake", progress=False)
    with pytest.raises(Fatal, match="401 unauthorized"):
        asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    opts.api_key = "k3y"
    s = asyncio.run(run(opts, transport=httpx.MockTransport(server)))
    assert (s.status, s.embedded) == ("complete", 6)
