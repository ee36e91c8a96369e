"""A whole dataset through `mae-client embed-dataset`, against the server's own best embed throughput.

    python -m bench.embed_dataset [--weights DIR|FILE | --tiny] [--images 400] [--pool cls] [--dtype float32]
                                  [--per-request 1,B] [--concurrency 1,2,4,8] [--duration 10] [--pause-training]

1. mae-serve (`python -m app.cli`) as a subprocess on loopback, the benchmark weights (ViT-B/16, as BENCHMARKS.md).
2. A dataset folder: `--images` files cycled from the photos of bench.common.PHOTOS (distinct names, real JPEGs).
3. The server's best: bench/loadgen.py's closed loop (pre-built requests, raw sockets, ~1% of a core) posting the
   dataset's images with the run's settings (`/v1/embed?format=npz&pool=..&dtype=..`), for every images-per-request
   in `--per-request` (B = the batch cap the server reports) and every client count in `--concurrency`; the
   best images/s of all. Measured before the dataset run and, for that best setting, once more after it.
4. The dataset run: `python -m client.mae_client embed-dataset DIR --out OUT` as a subprocess with its default settings
   (derived from /v1/models; `--dataset-concurrency auto,4` adds a run at 4 requests in flight). Its throughput:
   embedded images / the run's own seconds (manifest.json: from its start, /v1/models and the listing included,
   to the last row written); the process's wall time beside it.
5. ratio = dataset images/s / the server's best (the higher of before and after). Target: >= 0.9.

Writes bench/results/embed_dataset.json (--out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import (
    PHOTOS,
    PYTHON,
    REPO,
    TRAINING,
    VITB_DIR,
    WEIGHTS,
    machine,
    paused,
    photos,
    system_busy_s,
    table,
    write_json,
)
from bench.e2e import HOST, Server
from tests.harness import metric_value

BOUNDARY = loadgen.BOUNDARY
TINY = WEIGHTS / "mae_test_random.safetensors"


def make_tiny() -> Path:
    """A random-init `mae_test` (32 px, 2 blocks): a seconds-long smoke run of this script."""
    if not TINY.exists():
        import torch

        from model import MAE, get_config
        from model.formats import save

        torch.manual_seed(0)
        TINY.parent.mkdir(parents=True, exist_ok=True)
        save(MAE(get_config("mae_test")), TINY)
    return TINY


def make_dataset(folder: Path, n: int) -> list[tuple[str, bytes]]:
    pics = photos(1000)
    files = []
    for i in range(n):
        name, data = pics[i % len(pics)]
        rel = f"{i // 100:03d}/{i:05d}-{name}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        files.append((rel, data))
    return files


def multipart(port: int, path: str, images: list[tuple[str, bytes]]) -> bytes:
    """One POST with the images as repeated `image` fields, the form the client sends."""
    body = (
        b"".join(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name.rsplit("/", 1)[-1]}"\r\n'
            f"Content-Type: {'image/png' if name.endswith('.png') else 'image/jpeg'}\r\n\r\n".encode()
            + data
            + b"\r\n"
            for name, data in images
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: mae-bench\r\nAccept: */*\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def server_level(server: Server, files: list[tuple[str, bytes]], query: str, k: int, conc: int, args) -> dict:
    """The server's images/s with `conc` closed-loop clients posting `k` images a request."""
    path = f"/v1/embed?{query}"
    payloads = [multipart(server.port, path, [files[(i * k + j) % len(files)] for j in range(k)]) for i in range(12)]

    async def probe() -> dict:
        return {"cpu_s": server.cpu_seconds(), "sys_s": system_busy_s(), "self_s": time.process_time(),
                "t": time.perf_counter()}  # fmt: skip

    res = asyncio.run(
        loadgen.closed_loop(HOST, server.port, payloads, conc, warmup_s=args.warmup, duration_s=args.duration,
                            max_window_s=args.max_window, probe=probe)
    )  # fmt: skip
    s = loadgen.summarize(res)
    a, b = res.probes
    span = b["t"] - a["t"]
    server_cpu = b["cpu_s"] - a["cpu_s"]
    other = (b["sys_s"] - a["sys_s"]) - server_cpu - (b["self_s"] - a["self_s"])
    row = {
        "what": "server", "per_request": k, "concurrency": conc, "images_per_s": s["images_per_s"] * k,
        "latency_ms_p50": s["latency_ms_p50"], "errors": s["errors"], "window_s": span,
        "server_cpu_pct": 100 * server_cpu / span, "other_cpu_pct": 100 * max(0.0, other) / span,
    }  # fmt: skip
    print(f"  server, {k} image(s) a request, {conc} client(s): {row['images_per_s']:.2f} images/s "
          f"(other CPU {row['other_cpu_pct']:.0f}%)", flush=True)  # fmt: skip
    return row


def dataset_run(server: Server, src: Path, out: Path, args, concurrency: str = "auto") -> dict:
    cmd = [PYTHON, "-m", "client.mae_client", "--url", f"http://{HOST}:{server.port}", "embed-dataset", str(src),
           "--out", str(out), "--pool", args.pool, "--dtype", args.dtype, "--no-progress"]  # fmt: skip
    if concurrency != "auto":
        cmd += ["--concurrency", concurrency]
    before = metric_value(server.metrics(), "mae_images_total", op="embed")
    cpu0, sys0, kids0 = server.cpu_seconds(), system_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (kids.ru_utime - kids0.ru_utime) + (kids.ru_stime - kids0.ru_stime)
    server_cpu = server.cpu_seconds() - cpu0
    if p.returncode != 0:
        raise SystemExit(f"embed-dataset failed ({p.returncode}):\n{p.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    r = manifest["runs"][-1]
    computed = metric_value(server.metrics(), "mae_images_total", op="embed") - before
    row = {
        "what": f"embed-dataset ({concurrency})", "per_request": r["batch"], "concurrency": r["concurrency"],
        "images_per_s": r["images_per_s"], "run_s": r["seconds"], "process_wall_s": wall,
        "process_images_per_s": r["embedded"] / wall, "embedded": r["embedded"], "errors": r["errors"],
        "retries": r["retries"], "server_images_computed": computed, "client_cpu_pct": 100 * client_cpu / wall,
        "server_cpu_pct": 100 * server_cpu / wall,
        "other_cpu_pct": 100 * max(0.0, system_busy_s() - sys0 - client_cpu - server_cpu) / wall,
    }  # fmt: skip
    print(f"  embed-dataset: {row['embedded']} images in {row['run_s']:.1f} s = {row['images_per_s']:.2f} images/s "
          f"({r['batch']} a request, {r['concurrency']} in flight; process {wall:.1f} s; client CPU "
          f"{row['client_cpu_pct']:.0f}%)", flush=True)  # fmt: skip
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    weights = str(make_tiny()) if args.tiny else args.weights
    env = dict(kv.split("=", 1) for kv in args.env)
    work = Path(tempfile.mkdtemp(prefix="mae-bench-dataset-"))
    try:
        files = make_dataset(work / "src", args.images)
        server = Server("mae", weights, env)
        server.start()
        print(f"[bench] mae-serve ready in {server.ready_s:.1f} s; {len(files)} images in {work / 'src'}", flush=True)
        try:
            _, body = asyncio.run(loadgen.fetch(HOST, server.port, "/v1/models"))
            info = json.loads(body)
            cap = info["models"][0].get("max_batch_size") or 1
            query = f"format=npz&pool={args.pool}&dtype={args.dtype}"
            per_request = sorted({cap if k == "B" else int(k) for k in args.per_request.split(",")})
            levels = [int(c) for c in args.concurrency.split(",")]
            rows = [server_level(server, files, query, k, c, args) for k in per_request for c in levels]
            best = max(rows, key=lambda r: r["images_per_s"])
            runs = []
            for i, conc in enumerate(args.dataset_concurrency.split(",")):
                runs.append(dataset_run(server, work / "src", work / f"out{i}", args, conc))
            ours = runs[0]  # the client's defaults: the ratio's numerator
            after = server_level(server, files, query, best["per_request"], best["concurrency"], args)
            after["what"] = "server (after)"
            rows += [*runs, after]
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = max(best["images_per_s"], after["images_per_s"])
    return {
        "benchmark": "embed_dataset",
        "machine": machine(),
        "weights": weights,
        "photos": str(PHOTOS),
        "settings": vars(args),
        "server_batch_cap": cap,
        "rows": rows,
        "server_best": {k: best[k] for k in ("per_request", "concurrency", "images_per_s")},
        "server_best_after": after["images_per_s"],
        "dataset_images_per_s": ours["images_per_s"],
        "ratio": ours["images_per_s"] / reference,
        "ratio_process": ours["process_images_per_s"] / reference,
        "ratios_by_dataset_run": {r["what"]: r["images_per_s"] / reference for r in runs},
        "target": 0.9,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights", default=str(VITB_DIR), help="what mae-serve loads (default: the ViT-B of make_weights)"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead: checks the script runs")
    ap.add_argument("--images", type=int, default=400, help="dataset size (files cycled from the photos)")
    ap.add_argument("--pool", default="cls")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--per-request", default="1,B", help="images per request for the server's best (B: its cap)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="closed-loop clients for the server's best")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per server level (at least)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-window", type=float, default=40.0)
    ap.add_argument(
        "--dataset-concurrency",
        default="auto",
        help="embed-dataset runs, in order: auto (the client's default, the ratio's) and/or request counts",
    )
    ap.add_argument("--env", action="append", default=[], help="MAE_NAME=value for mae-serve (repeatable)")
    ap.add_argument("--pause-training", action="store_true", help="SIGSTOP the background training while measuring")
    ap.add_argument("--out", default="embed_dataset", help="results file name under bench/results/")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with paused(TRAINING if args.pause_training else None):
        result = run(args)
    cols = [("what", "", ""), ("per_request", "images / request", "d"), ("concurrency", "in flight", "d"),
            ("images_per_s", "images/s", ".2f"), ("latency_ms_p50", "p50 ms", ".0f"),
            ("client_cpu_pct", "client CPU %", ".0f"), ("other_cpu_pct", "other CPU %", ".0f")]  # fmt: skip
    print()
    print(table(result["rows"], cols, title=f"embed-dataset vs the server's best ({result['weights']})"))
    print(f"\nratio (dataset / server's best): {result['ratio']:.3f} (whole process: {result['ratio_process']:.3f}); "
          f"target >= {result['target']}")  # fmt: skip
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
