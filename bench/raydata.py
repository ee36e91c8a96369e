"""`mae-embed-ray` against `mae-client embed-dataset` through a local server: same images, same model, this machine.

    python -m bench.raydata [--images 240] [--shards 8] [--weights FILE] [--pool cls] [--name raydata]

1. A dataset: `--images` photos (bench.common.PHOTOS, cycled, distinct names) in `--shards` WebDataset tars.
2. embed-dataset: mae-serve (`python -m app.cli`, its defaults) as a subprocess, the client over the tars one by
   one (its source is one tar, or a brace range through fsspec); images/s = embedded / its runs' seconds.
3. Ray, 1 node: a local Ray (2 CPUs: one model actor of 1 CPU, decode tasks on the other).
4. Ray, 2 nodes: a head and a worker node (ray.cluster_utils.Cluster: separate raylets and object stores) on the
   same 2 cores, 2 logical CPUs each, 2 model actors: what spreading costs or buys when the cores are shared.
   Each Ray figure is the job's wall time (cluster already up, actors starting included) and again without the
   first shard's share (actors warm) from the manifest.
5. CPU-ms per image, in this process, one thread: the serving core's decode + preprocess of each photo, and the
   model call (batch of 8); from them, on paper, what an 8-GPU cluster needs.

Writes bench/results/<name>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, REPO, bundled_or_random_demo, machine, photos, table, write_json
from bench.e2e import HOST, Server


def make_tars(folder: Path, n: int, shards: int) -> list[Path]:
    pics = photos(100)
    per = -(-n // shards)
    paths = []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                name, data = pics[i % len(pics)]
                info = tarfile.TarInfo(f"{i:06d}.{name.rsplit('.', 1)[-1].lower()}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def run_embed_dataset(weights: Path, tars: list[Path], out: Path, pool: str) -> dict[str, Any]:
    server = Server("mae", str(weights), {})
    server.start()
    try:
        t0 = time.monotonic()
        seconds, embedded = 0.0, 0
        for k, tar in enumerate(tars):
            cmd = [PYTHON, "-m", "client.mae_client", "--url", f"http://{HOST}:{server.port}", "embed-dataset",
                   str(tar), "--out", str(out / f"s{k}"), "--pool", pool, "--no-progress"]  # fmt: skip
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                raise SystemExit(f"embed-dataset failed:\n{p.stderr[-2000:]}")
            m = json.loads((out / f"s{k}" / "manifest.json").read_text())
            seconds += m["timing"]["seconds"]
            embedded += m["timing"]["embedded"]
        wall = time.monotonic() - t0
    finally:
        server.stop()
    return {"what": "embed-dataset through a local mae-serve", "nodes": 1, "images": embedded,
            "seconds": round(seconds, 2), "images_per_s": round(embedded / seconds, 2),
            "wall_images_per_s": round(embedded / wall, 2)}  # fmt: skip


def run_ray(weights: Path, src: str, out: Path, pool: str, nodes: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from app.raydata.job import Options, run

    cluster = None
    if nodes == 1:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        t0 = time.monotonic()
        s = run(Options(src=src, out=str(out), weights=str(weights), pool=pool, concurrency=nodes, progress=False))
        wall = time.monotonic() - t0
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    assert s.status == "complete", s
    m = json.loads((out / "manifest.json").read_text())
    used = sorted({n for sh in m["shards"].values() for n in sh["nodes"]})
    # warm: from the first shard written to the last (actors up, model loaded), the images of the shards after it
    done = sorted(m["shards"].values(), key=lambda sh: sh["written_at_s"])
    span = done[-1]["written_at_s"] - done[0]["written_at_s"]
    warm = sum(sh["ok"] for sh in done[1:]) / span if span > 0 else float("nan")
    return {"what": f"mae-embed-ray, {nodes} node(s), {nodes} model actor(s)", "nodes": nodes, "images": s.embedded,
            "seconds": round(wall, 2), "images_per_s": round(s.embedded / wall, 2), "nodes_used": len(used),
            "warm_images_per_s": round(warm, 2),
            "batch": s.batch_size}  # fmt: skip


def cpu_ms(weights: Path, n: int) -> dict[str, float]:
    """CPU-ms per image of the serving core's decode + preprocess and of the model call, one thread."""
    import numpy as np
    import torch

    from app.raydata.stages import decode_batch, load_entry
    from app.serving import model_thread
    from app.settings import Settings

    torch.set_num_threads(1)
    import pyarrow as pa

    pics = [d for _, d in photos(100)]
    entry = load_entry(str(weights), None, "cpu")
    size = entry.config.img_size
    batch = pa.table({"shard": [0] * n, "index": list(range(n)), "last": [False] * n, "uri": ["x"] * n,
                      "sha256": ["x"] * n, "error": pa.nulls(n, pa.string()),
                      "data": [pics[i % len(pics)] for i in range(n)]})  # fmt: skip
    t = time.process_time()
    out = decode_batch(batch, size, "squash", Settings())
    decode = (time.process_time() - t) * 1000 / n
    pixels = torch.from_numpy(np.ascontiguousarray(out["pixels"]))
    model_thread.compute(model_thread.forward, entry, "embed", pixels[:8], None)  # warm
    t = time.process_time()
    for i in range(0, n - 7, 8):
        model_thread.compute(model_thread.forward, entry, "embed", pixels[i : i + 8], None)
    model = (time.process_time() - t) * 1000 / (n - n % 8)
    return {"decode_preprocess_ms": round(decode, 2), "model_ms": round(model, 2), "image_size": size}


def on_paper(ms: dict[str, float], gpu_images_per_s: float) -> dict[str, Any]:
    """An 8-GPU cluster: CPUs to decode for each GPU at its model throughput, from the measured decode CPU-ms."""
    per_gpu = gpu_images_per_s * ms["decode_preprocess_ms"] / 1000
    return {"gpu_images_per_s_assumed": gpu_images_per_s, "decode_cpus_per_gpu": round(per_gpu, 1),
            "cluster_images_per_s": 8 * gpu_images_per_s, "decode_cpus_total": round(8 * per_gpu)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--pool", default="cls")
    ap.add_argument("--gpu-images-per-s", type=float, default=2000.0,
                    help="a GPU's model throughput for the on-paper sizing (not measured here)")  # fmt: skip
    ap.add_argument("--name", default="raydata", help="bench/results/<name>.json")
    a = ap.parse_args()
    weights, label = (a.weights, str(a.weights)) if a.weights else bundled_or_random_demo()
    result: dict[str, Any] = {"machine": machine(), "weights": label, "images": a.images, "shards": a.shards}
    tmp = Path(tempfile.mkdtemp(prefix="bench-raydata-"))
    try:
        (tmp / "src").mkdir()
        tars = make_tars(tmp / "src", a.images, a.shards)
        src = str(tmp / "src" / f"shard-{{000000..{a.shards - 1:06d}}}.tar")
        rows = [run_embed_dataset(weights, tars, tmp / "ed", a.pool)]
        print(rows[-1], file=sys.stderr)
        for nodes in (1, 2):
            rows.append(run_ray(weights, src, tmp / f"ray{nodes}", a.pool, nodes))
            print(rows[-1], file=sys.stderr)
        result["rows"] = rows
        result["cpu_ms"] = cpu_ms(weights, 48)
        result["on_paper"] = on_paper(result["cpu_ms"], a.gpu_images_per_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(a.name, result)
    cols = [
        ("what", "", ""),
        ("images", "images", "d"),
        ("seconds", "seconds", ".1f"),
        ("images_per_s", "images/s", ".2f"),
    ]
    print(table(result["rows"], cols, title=f"Ray Data vs embed-dataset ({label})"))
    print(json.dumps({"cpu_ms": result["cpu_ms"], "on_paper": result["on_paper"]}, indent=1))


if __name__ == "__main__":
    main()
