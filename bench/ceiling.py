"""The ceiling: the bare model, no HTTP, no decoding, per batch size.

    python -m bench.ceiling [--weights DIR] [--batch-sizes 1,2,4,8,16,32] [--min-time 2] [--pause-training]

For each operation (reconstruct at mask ratio 0.75, embed at 0) and batch size: one warm-up call, then calls
until `--min-time` seconds and `--min-iters` calls have passed (at most `--max-iters`). Each call is what the
engine's model thread runs for a batch: `model.reconstruct(x, masking)` / `model.encode(x)` under
inference_mode on preprocessed photos, with the engine's CPU kernels (`--kernels`, default auto like the
server; `--kernels stock` = plain PyTorch, what the baseline's model runs on). Reports the median call latency
and images/s = batch / median latency.
Writes bench/results/ceiling.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import TRAINING, VITB_DIR, machine, median, paused, pct, photos, system_busy_s, table, write_json

OPS = {"reconstruct": 0.75, "embed": 0.0}


def images_tensor(size: int, n: int):
    import numpy as np
    import torch

    from app.serving import imaging
    from app.serving.model_thread import to_input

    pics = [imaging.preprocess(imaging.decode(b, 10**9), size) for _, b in photos()]  # uint8 (H, W, 3), as served
    batch = torch.from_numpy(np.stack([pics[i % len(pics)] for i in range(n)]))
    return to_input(batch, torch.device("cpu"), torch.float32)  # what the engine hands the model


class Bare:
    """The bare model as the engine runs it (same loader, same CPU kernels), on preprocessed photos."""

    def __init__(self, weights: str, kernels: str = "auto", threads: int = 0, max_batch: int = 32) -> None:
        import torch

        from app.serving.cpu_kernels import prepare_cpu_kernels
        from model.formats import load

        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = load(weights).model.eval()
        self.load_s = time.perf_counter() - t0
        # exactly what app.serving.registry._place does to a served CPU model
        switched = prepare_cpu_kernels(self.model, kernels)
        self.kernels = ("onednn" if kernels == "auto" else kernels) if switched else "stock"
        self.config = self.model.config
        self.pool = images_tensor(self.config.img_size, max_batch)
        self._warm: set[tuple[str, int]] = set()

    def call(self, op: str, b: int, seed: int) -> None:
        import torch

        from model.masking import Masking, len_keep_for_ratio, random_noise

        n = self.config.num_patches
        x = self.pool[:b]
        with torch.inference_mode():
            if op == "reconstruct":
                self.model.reconstruct(x, Masking(random_noise(b, n, seed=seed), len_keep_for_ratio(n, OPS[op])))
            else:
                self.model.encode(x, None)

    def measure(
        self,
        op: str,
        b: int,
        *,
        min_time: float = 1.5,
        min_iters: int = 3,
        max_iters: int = 200,
        max_other_cpu: float = 10.0,
        retries: int = 1,
    ) -> dict[str, Any]:
        """One warm-up call per (op, batch), then timed calls; measured again if other processes were busy."""
        if (op, b) not in self._warm:
            self.call(op, b, 0)
            self._warm.add((op, b))
        attempts = 0
        while True:
            attempts += 1
            lat: list[float] = []
            sys0, self0, start = system_busy_s(), time.process_time(), time.perf_counter()
            while len(lat) < max_iters and (len(lat) < min_iters or time.perf_counter() - start < min_time):
                t = time.perf_counter()
                self.call(op, b, len(lat) + 1)
                lat.append(time.perf_counter() - t)
            span = time.perf_counter() - start
            foreign = max(0.0, 100.0 * ((system_busy_s() - sys0) - (time.process_time() - self0)) / span)
            if foreign <= max_other_cpu or attempts > retries:
                break
            print(f"  (other processes used {foreign:.0f}% CPU: noisy, measuring again)", flush=True)
        med = median(lat)
        return {
            "op": op,
            "mask_ratio": OPS[op],
            "batch": b,
            "calls": len(lat),
            "latency_ms_p50": med * 1e3,
            "latency_ms_min": min(lat) * 1e3,
            "latency_ms_p90": pct(lat, 90) * 1e3,
            "images_per_s": b / med,
            "ms_per_image": med * 1e3 / b,
            "foreign_cpu_pct": foreign,
            "attempts": attempts,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bare = Bare(args.weights, args.kernels, args.threads, max(batches))
    c = bare.config
    rows = []
    for op in args.ops.split(","):
        for b in batches:
            row = bare.measure(
                op, b, min_time=args.min_time, min_iters=args.min_iters, max_iters=args.max_iters,
                max_other_cpu=args.max_other_cpu, retries=args.retries,
            )  # fmt: skip
            rows.append(row)
            print(
                f"  {op:11s} b={b:<3d} {row['latency_ms_p50']:9.1f} ms  {row['images_per_s']:7.2f} img/s"
                f"  ({row['calls']} calls, other CPU {row['foreign_cpu_pct']:.0f}%)",
                flush=True,
            )
    best = {}
    for op in OPS:
        r = [x for x in rows if x["op"] == op]
        if r:
            top = max(r, key=lambda x: x["images_per_s"])
            b1 = next((x for x in r if x["batch"] == 1), None)
            best[op] = {
                "best_batch": top["batch"],
                "best_images_per_s": top["images_per_s"],
                "batch1_latency_ms": b1["latency_ms_p50"] if b1 else None,
                "batch1_images_per_s": b1["images_per_s"] if b1 else None,
            }
    return {
        "benchmark": "ceiling",
        "machine": machine(),
        "weights": str(args.weights),
        "model": c.name,
        "kernels": bare.kernels,
        "load_s": bare.load_s,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "rows": rows,
        "summary": best,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="bare-model throughput and latency per batch size (no HTTP)")
    ap.add_argument("--weights", default=str(VITB_DIR), help="any checkpoint model.formats.load reads")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--ops", default="reconstruct,embed")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per point (at least)")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--max-other-cpu", type=float, default=10.0, help="percent; above it a point is measured again")
    ap.add_argument("--retries", type=int, default=1, help="extra attempts for a noisy point")
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "onednn", "onednn-packed", "stock"],
        help="fp32 CPU linear kernels, as MAE_CPU_KERNELS (default: the server's default, auto)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument(
        "--pause-training",
        action="store_true",
        help="SIGSTOP the background training (bench.common.TRAINING) while measuring",
    )
    ap.add_argument("--out", default="ceiling", help="results file name under bench/results/")
    args = ap.parse_args(argv)
    with paused(TRAINING if args.pause_training else None):
        result = run(args)
    cols = [
        ("op", "op", ""),
        ("batch", "batch", "d"),
        ("latency_ms_p50", "latency p50 (ms)", ".1f"),
        ("ms_per_image", "ms / image", ".1f"),
        ("images_per_s", "images/s", ".2f"),
        ("calls", "calls", "d"),
        ("foreign_cpu_pct", "other CPU %", ".0f"),
    ]
    print(table(result["rows"], cols, f"ceiling: {result['model']}, {result['kernels']} kernels (bare model, no HTTP)"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
