"""The host path: what the server costs per image when the model costs nothing, and how it compares with peers.

    python -m bench.host_path [--parts null,gil,peers,hog] [--models small,vitb] [--pause-training]

Parts (each writes its rows into bench/results/host_path.json; every server is a subprocess on loopback, driven by
bench/loadgen.py's closed loop, 8 clients unless said otherwise):

- null:  the null model (bench/make_weights.py: 224 px, 16 wide, 1 deep; compute ~0): images/s and the server's
         CPU-ms per image (every process of it, from /proc), per endpoint and answer format, MAE_WORKERS 1 and 2.
- gil:   py-spy --gil on the one-process server under the same load: the GIL-held milliseconds per image.
- peers: a small ViT (192 wide, 4 deep) and ViT-B/16: mae-serve (1 and 2 workers), LitServe (bench/litserve_server.py,
         its documented dynamic batching) and, for ViT-B, the FastAPI + transformers baseline, all with the same
         weights and the same input (JSON, base64 image; the baseline takes only a multipart upload), reconstruct
         (PNG of the paste view) and embed (CLS); beside them the
         in-process pipeline ceiling (decode -> batch -> model -> encode, no HTTP, two decode threads, best batch)
         and the bare model's best batch (bench/ceiling.py).
- hog:   the small ViT's reconstruct, quiet and with a busy loop pinned to one of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import cpu_dtype as bare_cpu_dtype
from bench import loadgen
from bench.common import (
    NULL,
    PYTHON,
    SMALL,
    TRAINING,
    VITB_DIR,
    checkout,
    machine,
    median,
    paused,
    photos,
    table,
    write_json,
)
from bench.e2e import HOST, Server, measure

NULL_ROUTES = [  # (label, path, op)
    ("reconstruct png", "/v1/reconstruct?mask_ratio=0.75", "reconstruct"),
    ("reconstruct json", "/v1/reconstruct?mask_ratio=0.75&format=json", "reconstruct"),
    ("embed cls json", "/v1/embed?pool=cls", "embed"),
    ("embed all json", "/v1/embed?pool=all", "embed"),
    ("embed npz", "/v1/embed?format=npz", "embed"),
]
HEADLINE_ROUTES = [NULL_ROUTES[0], NULL_ROUTES[2]]  # reconstruct PNG and embed CLS JSON: the two figures
MODELS = {"small": SMALL, "vitb": VITB_DIR, "null": NULL}


def multipart(server: Server, path: str, pics: list[tuple[str, bytes]]) -> list[bytes]:
    return [loadgen.multipart_request(HOST, server.port, path, n, d, "image/jpeg") for n, d in pics]


def json_bodies(server: Server, path: str, pics: list[tuple[str, bytes]]) -> list[bytes]:
    return [
        loadgen.json_request(HOST, server.port, path, json.dumps({"image": base64.b64encode(d).decode()}).encode())
        for _, d in pics
    ]


def add_load_arguments(ap: argparse.ArgumentParser) -> None:
    """The closed-loop load and measurement window every host-path run uses (bench.e2e.measure reads them)."""
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="whole runs of each part; the tables give medians")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--min-rounds", type=float, default=6.0)
    ap.add_argument("--max-window", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--max-other-cpu", type=float, default=15.0)
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--pause-training", action="store_true")


def serve_routes(server: Server, routes: list[tuple[str, str, str]], pics: list[tuple[str, bytes]],
                 args: argparse.Namespace) -> list[dict]:  # fmt: skip
    """Start `server`, measure each route with multipart uploads of `pics`, stop it: one row per route."""
    server.start()
    try:
        return [level(server, label, op, multipart(server, path, pics), args.clients, args)
                for label, path, op in routes]  # fmt: skip
    finally:
        server.stop()


def level(server: Server, label: str, op: str, payloads: list[bytes], conc: int, args: argparse.Namespace) -> dict:
    row = measure(server, op, payloads, conc, args)
    row.update(route=label, workers=server.env.get("MAE_WORKERS", "1"))
    if row["errors"]:  # a server that refuses the requests measures nothing: stop, do not record 0 images/s
        raise SystemExit(f"{server.label} {label}: {row['errors']} failed requests; see {server.log_path}")
    return row


# ---------------------------------------------------------------------------------------------- parts
def part_null(args: argparse.Namespace, pics: list[tuple[str, bytes]]) -> list[dict]:
    rows = []
    servers = [Server("mae", str(NULL), {"MAE_WORKERS": w}, label=f"mae-serve w{w}") for w in args.workers.split(",")]
    # the lossy JPEG shortcut the old default took (MAE_JPEG_DRAFT), to compare like with like
    servers.append(Server("mae", str(NULL), {"MAE_WORKERS": "1", "MAE_JPEG_DRAFT": "true"}, label="mae-serve w1 draft"))
    with tempfile.TemporaryDirectory(prefix="mae-before-") as tmp:
        if args.before:  # the same load on the code before this work (its app/ and model/), side by side
            before = checkout(args.before, Path(tmp), ("app", "model"))
            servers.insert(0, Server("mae", str(NULL), {}, label=f"before ({args.before})", cwd=before))
        for server in servers:
            rows += serve_routes(server, NULL_ROUTES, pics, args)
    return rows


def part_gil(args: argparse.Namespace, pics: list[tuple[str, bytes]]) -> list[dict]:
    """GIL-held ms per image: py-spy --gil samples only the thread holding the GIL; samples / rate = seconds held."""
    rows = []
    server = Server("mae", str(NULL), {"MAE_WORKERS": "1"})
    server.start()
    try:
        for label, path, _ in HEADLINE_ROUTES:
            payloads = multipart(server, path, pics)
            asyncio.run(loadgen.closed_loop(HOST, server.port, payloads, args.clients, warmup_s=2, duration_s=1))
            out = Path(tempfile.mkstemp(suffix=".raw")[1])
            rate, seconds = 100, max(1, round(args.duration))  # py-spy takes whole seconds ("-d 8.0" is an error)
            spy_cmd = [str(Path(PYTHON).parent / "py-spy"), "record", "--gil", "-p", str(server.pid), "-r", str(rate),
                       "-d", str(seconds), "-f", "raw", "-o", str(out)]  # fmt: skip
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t0 = time.perf_counter()
            res = asyncio.run(
                loadgen.closed_loop(HOST, server.port, payloads, args.clients, warmup_s=0.1, duration_s=seconds)
            )
            elapsed = time.perf_counter() - t0
            if spy.wait() != 0:
                raise SystemExit(f"py-spy failed ({spy.returncode}): {' '.join(spy_cmd)}")
            samples = sum(int(line.rpartition(" ")[2]) for line in out.read_text().splitlines() if line.strip())
            images = sum(1 for r in res.records if r.status == 200 and r.end - t0 <= seconds)
            rows.append(
                {
                    "route": label,
                    "images": images,
                    "gil_held_s": samples / rate,
                    "gil_ms_per_image": 1e3 * samples / rate / images if images else None,
                    "gil_share_of_wall": samples / rate / min(elapsed, seconds),
                }
            )
            print(f"  gil {label}: {rows[-1]['gil_ms_per_image']:.2f} ms/image held", flush=True)
    finally:
        server.stop()
    return rows


def part_peers(args: argparse.Namespace, pics: list[tuple[str, bytes]]) -> list[dict]:
    rows = []
    for name, dt in ((m, d) for m in args.models.split(",") for d in args.dtypes.split(",")):
        weights = str(MODELS[name])
        bare = bare_all(weights, dt)
        for op, path in (("reconstruct", "/v1/reconstruct?mask_ratio=0.75&seed=3"), ("embed", "/v1/embed?pool=cls")):
            servers = [
                Server("mae", weights, {"MAE_WORKERS": w, "MAE_DTYPE": dt}, label=f"mae-serve w{w}")
                for w in args.workers.split(",")
            ]
            litserve = {"max-batch-size": "4", "batch-timeout": "0.005", "dtype": dt}
            servers.append(Server(f"litserve-{op}", weights, litserve))
            if name == "vitb" and dt == "float32":  # the twenty-line FastAPI + transformers server: fp32 only
                servers.append(Server("baseline", weights, {}, "async"))
            for server in servers:
                server.start()
                try:
                    if server.kind == "baseline":  # its one input form: a multipart upload
                        payloads = multipart(server, path.split("?")[0], pics)
                    else:
                        url = f"/{op}" if server.kind.startswith("litserve") else path
                        payloads = json_bodies(server, url, pics)
                    row = level(server, op, op, payloads, args.clients, args)
                    row.update(model=name, op=op, dtype=dt)
                    rows.append(row)
                finally:
                    server.stop()
            pipe = pipeline_ceiling(weights, op, pics, dtype=dt)
            rows.append({"model": name, "op": op, "dtype": dt, "server": "in-process pipeline", **pipe})
            best = max(bare_cpu_dtype.BATCHES, key=lambda b, op=op: bare[f"{op}|{b}"])
            bare_row = {"images_per_s": bare[f"{op}|{best}"], "batch": best}
            rows.append({"model": name, "op": op, "dtype": dt, "server": "bare model", **bare_row})
    return rows


def bare_all(weights: str, dtype: str) -> dict[str, float]:
    """The bare model through model_thread.forward in a fresh process with mae-serve's OpenMP choice
    (bench/cpu_dtype.py): images/s per op and batch."""
    return bare_cpu_dtype.bare(weights, dtype, "auto")


def part_hog(args: argparse.Namespace, pics: list[tuple[str, bytes]]) -> list[dict]:
    rows = []
    for threads in ("0", "1"):  # the CPU policy (2 threads on 2 CPUs) and one thread
        server = Server("mae", str(SMALL), {"MAE_TORCH_THREADS": threads}, label=f"mae-serve threads={threads}")
        server.start()
        try:
            payloads = json_bodies(server, "/v1/reconstruct?mask_ratio=0.75&seed=3", pics)
            quiet = level(server, "reconstruct quiet", "reconstruct", payloads, args.clients, args)
            hog = subprocess.Popen(["taskset", "-c", "0", PYTHON, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                args_hog = argparse.Namespace(**{**vars(args), "max_other_cpu": 1000.0})  # the hog is the point
                busy = level(server, "reconstruct with a hog", "reconstruct", payloads, args.clients, args_hog)
            finally:
                hog.kill()
                hog.wait()
        finally:
            server.stop()
        busy["vs_quiet"] = busy["images_per_s"] / quiet["images_per_s"]
        rows += [quiet, busy]
        print(f"  hog, torch threads {threads}: {busy['vs_quiet']:.2f} of quiet", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- ceilings
def pipeline_ceiling(
    weights: str, op: str, pics: list[tuple[str, bytes]], n: int = 96, dtype: str = "float32"
) -> dict[str, Any]:
    """decode -> batch -> model -> encode in this process, no HTTP: two threads decode and encode (as the server's
    I/O pool does, Pillow and zlib release the GIL) while the model thread runs batch after batch; best batch."""
    import torch

    from app.http.jsonio import dumps
    from app.serving import imaging, model_thread, render
    from app.serving.cpus import configure_torch_threads
    from app.serving.registry import Registry
    from app.settings import Settings
    from model.masking import Masking, len_keep_for_ratio, random_noise

    configure_torch_threads(0, on_gpu=False)
    registry = model_thread.run(Registry.from_settings, Settings(weights=weights, dtype=dtype))
    entry = next(iter(registry.entries.values()))
    c = entry.config
    best: dict[str, Any] = {}
    for b in (1, 2, 4, 8):
        with ThreadPoolExecutor(2) as pool:

            def prep(data: bytes) -> Any:
                return imaging.load(data, c.img_size, "squash", 10**9)

            def encode(r: Any, image: Any) -> bytes:
                if op == "embed":
                    return dumps({"cls": r.cls})
                from app.serving.pipeline import ReconstructAnswer

                return render.encode_png(render.view(ReconstructAnswer.of(entry, image, r, 3), "paste"))

            t0 = time.perf_counter()
            pending = []
            images = [pool.submit(prep, pics[i % len(pics)][1]) for i in range(n)]
            for start in range(0, n, b):
                batch = [f.result() for f in images[start : start + b]]
                masking = None
                if op == "reconstruct":
                    nb, length = len(batch), c.num_patches
                    masking = Masking(random_noise(nb, length, seed=3), len_keep_for_ratio(length, 0.75))
                out = model_thread.run(model_thread.compute, model_thread.forward, entry, op, batch, masking)
                pending += [pool.submit(encode, r, im) for r, im in zip(out, batch, strict=True)]
            for f in pending:
                f.result()
            rate = n / (time.perf_counter() - t0)
        if not best or rate > best["images_per_s"]:
            best = {"images_per_s": rate, "batch": b}
    torch.set_num_threads(torch.get_num_threads())
    return best


KEYS = ("route", "model", "op", "dtype", "server", "workers")
NUMBERS = ("images_per_s", "server_cpu_ms_per_image", "latency_ms_p50", "latency_ms_p99", "server_cpu_pct",
           "foreign_cpu_pct", "gil_ms_per_image", "gil_share_of_wall", "vs_quiet", "batch_mean")  # fmt: skip


def medians(runs: list[list[dict]]) -> list[dict]:
    """Row i of every run (the same configuration) -> one row: the median of each number, the runs' values kept."""
    out = []
    for same in zip(*runs, strict=True):
        row = {k: same[0][k] for k in KEYS if k in same[0]}
        for k in NUMBERS:
            values = [r[k] for r in same if r.get(k) is not None]
            if values:
                row[k] = median(values)
                row[f"{k}_runs"] = values
        if "batch" in same[0]:
            row["batch"] = same[0]["batch"]
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="null,gil,peers,hog")
    ap.add_argument("--models", default="small,vitb")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--dtypes", default="float32", help="peers part: float32,bfloat16 for both")
    ap.add_argument("--before", default="51a7c74^", help="null part: also the server of this git revision ('' = no)")
    add_load_arguments(ap)
    ap.add_argument("--out", default="host_path")
    args = ap.parse_args(argv)
    pics = photos(args.images)
    result: dict[str, Any] = {"benchmark": "host_path", "machine": machine(), "settings": vars(args)}
    parts = {"null": part_null, "gil": part_gil, "peers": part_peers, "hog": part_hog}
    for part in args.parts.split(","):
        runs = []
        for rep in range(args.repeats):  # whole runs of the part, one after the other: medians side by side
            print(f"[bench] host path: {part}, run {rep + 1} of {args.repeats}", flush=True)
            with paused(TRAINING if args.pause_training else None):
                runs.append(parts[part](args, pics))
        result[part] = medians(runs)
        result[f"{part}_runs"] = runs
        write_json(args.out, result)  # after every part: a later part's failure keeps what was measured
    cols = [
        ("server", "server", ""),
        ("route", "route", ""),
        ("workers", "workers", ""),
        ("images_per_s", "images/s", ".1f"),
        ("server_cpu_ms_per_image", "server CPU ms/image", ".2f"),
        ("latency_ms_p50", "p50 ms", ".0f"),
        ("server_cpu_pct", "server CPU %", ".0f"),
        ("foreign_cpu_pct", "other %", ".0f"),
    ]
    if "null" in result:
        print(table(result["null"], cols, "null model"))
    if "peers" in result:
        pc = [("model", "model", ""), ("dtype", "dtype", ""), ("op", "op", ""), ("server", "server", ""),
              ("images_per_s", "images/s", ".1f"),
              ("server_cpu_ms_per_image", "CPU ms/image", ".2f"), ("batch", "batch", "")]  # fmt: skip
        print(table(result["peers"], pc, "peers"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
