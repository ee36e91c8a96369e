"""`mae-client embed-dataset` against a real mae-serve: a generated folder with corrupt and unsupported files, a list
and a tar; the embeddings equal /v1/embed one by one; a run killed (SIGINT, SIGKILL; a real subprocess of the CLI)
and resumed ends as an uninterrupted one (the same index, embeddings to float rounding), without computing an image
twice (the server's mae_images_total); an overloaded server (tiny MAE_MAX_QUEUE) is got through by retries. The
servers run in this process (tests.serving.live_server), slowed where a test needs time to act.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.serving import metrics, model_thread
from client.dataset import embed_dataset
from client.mae_client import MAEClient, load_embeddings, load_index
from tests.serving import counter_value, image_bytes, live_server

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def make_dataset(root: Path, n_good: int, bad: bool = True) -> tuple[dict[str, bytes], dict[str, str]]:
    """n_good decodable images (PNG / JPEG / WebP, several sizes and modes, in nested folders) and, with bad=True,
    corrupt and unsupported ones. -> ({path: bytes} of the good, {path: expected error prefix} of the bad)."""
    good: dict[str, bytes] = {}
    fmts = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")]
    for i in range(n_good):
        fmt, ext = fmts[i % 3]
        mode = "L" if i % 7 == 0 else "RGB"
        rel = f"part{i % 4}/{'deep/' if i % 5 == 0 else ''}img{i:04d}.{ext}"
        good[rel] = image_bytes(16 + i % 40, 12 + i % 33, fmt=fmt, seed=i, mode=mode)
    bad_files: dict[str, tuple[bytes, str]] = {}
    if bad:
        png = image_bytes(30, 30)
        for fmt, ext in [("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")]:
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format=fmt)
            bad_files[f"part1/unsupported.{ext}"] = (buf.getvalue(), "415 unsupported_type")
        bad_files["part0/truncated.png"] = (png[: len(png) // 2], "400 undecodable")
        bad_files["part2/garbage.jpg"] = (b"\xff\xd8\xff" + os.urandom(300), "400 undecodable")
        bad_files["part2/empty.png"] = (b"", "400 empty_image")
        bad_files["part3/text.jpg"] = (b"not an image at all", "415 unsupported_type")
        bad_files["part3/deep/zzz.webp"] = (b"RIFF\x10\x00\x00\x00WEBPVP8 broken", "400 undecodable")
    for rel, data in [*good.items(), *((r, d) for r, (d, _) in bad_files.items())]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "part0" / "labels.txt").write_text("not an image: not in the index")
    return good, {r: e for r, (_, e) in bad_files.items()}


def images_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'^mae_images_total\{op="embed"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def settled_images_total(url: str) -> float:
    """mae_images_total once the server is idle (requests of a killed client may still be computing)."""
    last, stable_since = images_total(url), time.monotonic()
    while time.monotonic() - stable_since < 0.5:
        time.sleep(0.05)
        now = images_total(url)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def one_by_one(url: str, good: dict[str, bytes], **params) -> dict[str, dict[str, np.ndarray]]:
    """Each image in its own POST /v1/embed (4 requests at a time)."""
    with MAEClient(url) as c, ThreadPoolExecutor(4) as pool:
        answers = pool.map(lambda data: c.embed(data, **params), good.values())
        return dict(zip(good, answers, strict=True))


# ---------------------------------------------------------------------------------------------- in-process server
@pytest.fixture(scope="module")
def server(make_settings):
    with live_server(make_settings(warmup=False, log_level="warning")) as (url, _):
        yield url


def test_folder_every_good_image_embedded_every_bad_one_recorded(server, tmp_path):
    good, bad = make_dataset(tmp_path / "src", 240)
    out = tmp_path / "out"
    before = images_total(server)
    s = embed_dataset(tmp_path / "src", out, url=server, pool="all", progress=False, shard_size=100)
    assert (s.status, s.embedded, s.errors) == ("complete", 240, len(bad)), s
    assert s.batch == 4 and s.concurrency == 2  # from /v1/models: a CPU model's batch cap of 4
    # Every image counted once by the server, plus the good companions of a corrupt image in its failed request
    assert images_total(server) - before == 240 + s.resent
    index = load_index(out)
    rows = {p: (st, e) for p, st, e in zip(index["path"], index["status"], index["error"], strict=True)}
    assert set(rows) == set(good) | set(bad)
    for path, prefix in bad.items():
        assert rows[path][0] == "error" and rows[path][1].startswith(prefix), (path, rows[path])
    cls, ok = load_embeddings(out)
    assert cls.shape == (240, 32) and len(cls.shards) == 3 and cls.dtype == np.float32
    arrays = {k: load_embeddings(out, k)[0] for k in ("cls", "mean", "patches", "patch_indices")}
    ref = one_by_one(server, good, pool="all")
    for i, path in enumerate(ok["path"]):
        for key, a in arrays.items():
            np.testing.assert_allclose(a[i], ref[path][key], rtol=1e-5, atol=1e-6, err_msg=f"{path} {key}")
    # run again: every image is in the index, verified by its sha256; nothing is sent
    before = images_total(server)
    snapshot = {f.name: f.read_bytes() for f in out.iterdir() if f.name != "manifest.json"}
    s = embed_dataset(tmp_path / "src", out, url=server, pool="all", progress=False, shard_size=100)
    assert (s.status, s.skipped, s.embedded, s.requests) == ("complete", 240 + len(bad), 0, 0)
    assert images_total(server) == before
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name != "manifest.json"} == snapshot


def test_list_and_tar_sources_float16_masked_equal_one_by_one(server, tmp_path):
    good, _ = make_dataset(tmp_path / "src", 24, bad=False)
    params = {"pool": "patches", "dtype": "float16", "mask_ratio": 0.5, "seed": 7}
    ref = one_by_one(server, good, **params)

    listing = tmp_path / "images.txt"
    listing.write_text(
        "\n".join(f"src/{p}" for p in good) + f"\nsrc/missing.png\n{tmp_path / 'src' / next(iter(good))}\n"
    )
    s = embed_dataset(listing, tmp_path / "out-list", url=server, progress=False, **params)
    assert (s.status, s.embedded, s.errors) == ("complete", 25, 1)  # the absolute path is its own entry

    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar, "w") as tf:  # WebDataset layout: key.ext members, labels beside the images
        for i, (path, data) in enumerate(good.items()):
            for name, payload in [(f"{i:06d}.{path.rsplit('.', 1)[1]}", data), (f"{i:06d}.cls", str(i).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    s = embed_dataset(tar, tmp_path / "out-tar", url=server, progress=False, **params)
    assert (s.status, s.embedded, s.errors) == ("complete", 24, 0)

    for out in ("out-list", "out-tar"):
        patches, ok = load_embeddings(tmp_path / out)
        indices, _ = load_embeddings(tmp_path / out, "patch_indices")
        assert patches.dtype == np.float16 and patches.shape == (len(ok["path"]), 8, 32)  # half of the 16 patches
        by_sha = {sha: i for i, sha in enumerate(ok["sha256"])}
        for path, data in good.items():
            i = by_sha[hashlib.sha256(data).hexdigest()]
            np.testing.assert_allclose(patches[i].astype(np.float32), ref[path]["patches"].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)  # fmt: skip
            np.testing.assert_array_equal(indices[i], ref[path]["patch_indices"])  # the same seeded mask
    index = load_index(tmp_path / "out-list")
    errors = [(p, e) for p, st, e in zip(index["path"], index["status"], index["error"], strict=True) if st == "error"]
    assert len(errors) == 1 and errors[0][0] == "src/missing.png" and errors[0][1].startswith("unreadable")


def test_overloaded_server_completes_through_retries(server, make_settings, tmp_path):
    def slow(entry, op, images, masking):
        time.sleep(0.03)  # 2 images / 30 ms; 6 in flight for a queue of 2
        return model_thread.forward(entry, op, images, masking)

    good, _ = make_dataset(tmp_path / "src", 24, bad=False)
    s = make_settings(warmup=False, log_level="warning", max_batch_size=2, max_queue=2, retry_after_s=1)
    with live_server(s, forward=slow) as (url, _):
        rejected = counter_value(metrics.REJECTS, "queue_full")
        before = images_total(url)
        t = time.monotonic()
        r = embed_dataset(tmp_path / "src", tmp_path / "out", url=url, concurrency=6, batch=1, progress=False)
        took = time.monotonic() - t
        refused = counter_value(metrics.REJECTS, "queue_full") - rejected
        assert (r.status, r.embedded, r.errors) == ("complete", 24, 0), r
        assert refused > 0 and r.retries == refused and r.refused == {"503": refused}, (refused, r)
        assert took >= 1.0  # at least one retry waited for Retry-After: 1
        assert images_total(url) - before == 24  # a refused image is never computed: none twice
    ref = one_by_one(server, good, pool="cls")  # the same weights on a server with room
    cls, ok = load_embeddings(tmp_path / "out")
    for i, path in enumerate(ok["path"]):
        np.testing.assert_allclose(cls[i], ref[path]["cls"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- subprocesses
def cli(url: str, src: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "client.mae_client", "--url", url, "embed-dataset", str(src), "--out", str(out),
           "--pool", "all", "--shard-size", "32", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def index_rows(out: Path) -> int:
    try:
        return (out / "index.csv").read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return 0


def assert_same_output(out: Path, reference: Path) -> None:
    """The index byte for byte; the same shard files, shapes and dtypes; embeddings equal to float rounding (the
    server may batch an image with other companions after a resume, and a batch of 2 rounds unlike a batch of 1)."""
    assert (out / "index.csv").read_bytes() == (reference / "index.csv").read_bytes()
    shards = sorted(f.name for f in out.glob("*.npy"))
    assert shards == sorted(f.name for f in reference.glob("*.npy"))
    for name in shards:
        a, b = np.load(out / name), np.load(reference / name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def kill_midway(url: str, src: Path, out: Path, sig: int, at_rows: int) -> tuple[int, str]:
    proc = cli(url, src, out)
    try:
        end = time.monotonic() + 60
        while index_rows(out) < at_rows:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "the run did not progress"
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


N_KILL, AT_ROWS = 80, 30


def test_killed_midway_and_resumed_ends_as_an_uninterrupted_run(tmp_path, make_settings):
    make_dataset(tmp_path / "src", N_KILL, bad=False)
    (tmp_path / "src" / "part2" / "anim.gif").write_bytes(image_bytes(8, 8, fmt="GIF"))  # an error row, sent alone

    def slow(entry, op, images, masking):  # a run of ~1 s or more: the signal lands midway
        time.sleep(0.02)
        return model_thread.forward(entry, op, images, masking)

    # The server in this process (a thread); the CLI a real subprocess, signalled and killed.
    settings = make_settings(warmup=False, log_level="warning", max_batch_size=2)
    with live_server(settings, forward=slow) as (url, _):
        src = tmp_path / "src"
        # batch cap 2: 2 images a request, 2 requests in flight, up to 2 x 2 chunks held: 8 images
        held = 8

        t = time.monotonic()
        ref = tmp_path / "ref"  # uninterrupted, in this process
        before = images_total(url)
        r = embed_dataset(src, ref, url=url, pool="all", shard_size=32, progress=False)
        uninterrupted_s = time.monotonic() - t
        assert (r.status, r.embedded, r.errors) == ("complete", N_KILL, 1)
        assert images_total(url) - before == N_KILL

        # SIGINT (Ctrl-C): the requests in flight finish and are written; nothing computed is lost
        out = tmp_path / "sigint"
        before = images_total(url)
        rc, err = kill_midway(url, src, out, signal.SIGINT, at_rows=AT_ROWS)
        assert rc == 130 and "stopping after the requests in flight" in err, err
        assert "img/s" in err and "interrupted: " in err  # the tqdm bar and the summary line
        n_ok = len(load_embeddings(out)[0])  # consistent: loadable, rows and index agree
        assert AT_ROWS - 1 <= n_ok < N_KILL
        assert settled_images_total(url) - before == n_ok  # every computed image was written (none after)
        held_rows = len(load_index(out)["path"])  # ok rows and the error row, if reached
        p = cli(url, src, out)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and f"{held_rows} already there" in err, err  # skipped, verified by sha256
        assert images_total(url) - before == N_KILL  # over both runs: each image computed once
        assert_same_output(out, ref)

        # SIGKILL: nothing runs on the way out; what was in flight is lost and computed again, nothing else
        out = tmp_path / "sigkill"
        before = images_total(url)
        rc, _ = kill_midway(url, src, out, signal.SIGKILL, at_rows=AT_ROWS)
        assert rc == -signal.SIGKILL
        n_ok = len(load_embeddings(out)[0])
        at_kill = settled_images_total(url) - before
        assert n_ok <= at_kill <= n_ok + held, (n_ok, at_kill)
        p = cli(url, src, out)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert images_total(url) - before - at_kill == N_KILL - n_ok  # only what the index did not hold
        assert_same_output(out, ref)
        print(f"\nembed-dataset: uninterrupted run of {N_KILL + 1} images {uninterrupted_s:.1f} s; killed at "
              f"{n_ok} rows, {at_kill - n_ok:.0f} computed images lost to SIGKILL (bound {held})")  # fmt: skip
