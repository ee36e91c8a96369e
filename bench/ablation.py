"""What moved the numbers: mae-serve as it was before the performance work, and with each change turned off,
side by side in one run (same machine state, same load).

    python -m bench.ablation [--before-rev 7883412] [--concurrency 1,8] [--reps 1] [--pause-training]

Variants (ViT-B/16, fp32):
- before:            app/ of git revision --before-rev (extracted with `git archive` into a temporary directory;
                     model/ is this checkout's, so the HF directory loads the same way);
- stock kernels:     today's server with MAE_CPU_KERNELS=stock (PyTorch's own fp32 linear kernels);
- no CPU batch cap:  today's server with MAE_CPU_MAX_BATCH_SIZE=32 (batches as large as the queue allows), at
                     --cap-concurrency clients only (below 8 clients batches never pass the cap anyway);
- now:               today's server, defaults.
Writes bench/results/ablation.json. With --reps 2 the variants run twice in alternation (ABCD ABCD).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import e2e, loadgen
from bench.common import REPO, TRAINING, VITB_DIR, checkout, machine, paused, photos, table, write_json


def run(args: argparse.Namespace) -> dict[str, Any]:
    pics = photos(args.images)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mae-before-") as tmp:
        before = checkout(args.before_rev, Path(tmp))
        high = [int(c) for c in args.cap_concurrency.split(",") if c]
        variants = [
            (f"before ({args.before_rev})", {}, before, levels),
            ("stock kernels", {"MAE_CPU_KERNELS": "stock"}, REPO, levels),
            ("no CPU batch cap", {"MAE_CPU_MAX_BATCH_SIZE": "32"}, REPO, high),  # the cap only acts past 4 clients
            ("now", {}, REPO, sorted(set(levels + high))),
        ]
        e2e_args = e2e.build_parser().parse_args(
            ["--duration", str(args.duration), "--warmup", str(args.warmup), "--max-other-cpu", "15"]
        )
        for rep in range(args.reps):
            for label, env, cwd, variant_levels in variants:
                server = e2e.Server("mae", args.weights, env, label=label, cwd=cwd)
                server.start()
                print(f"[bench] {label} ready in {server.ready_s:.1f} s", flush=True)
                try:
                    for endpoint in args.endpoint.split(","):
                        payloads = [
                            loadgen.multipart_request(
                                e2e.HOST, server.port, f"/v1/{endpoint}?{e2e.QUERIES[endpoint]}", n, d, "image/jpeg"
                            )
                            for n, d in pics
                        ]
                        for conc in variant_levels:
                            row = e2e.measure(server, endpoint, payloads, conc, e2e_args)
                            rows.append({**row, "variant": label, "rep": rep + 1})
                finally:
                    server.stop()
    return {"benchmark": "ablation", "machine": machine(), "settings": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="mae-serve before the performance work and with each change off")
    ap.add_argument("--before-rev", default="7883412", help="git revision whose app/ is 'before'")
    ap.add_argument("--weights", default=str(VITB_DIR))
    ap.add_argument("--endpoint", default="reconstruct,embed")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--cap-concurrency", default="32", help="levels for the no-cap variant (and now)")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--pause-training", action="store_true", help="SIGSTOP the background training while measuring")
    ap.add_argument("--out", default="ablation")
    args = ap.parse_args(argv)
    with paused(TRAINING if args.pause_training else None):
        result = run(args)
    cols = [
        ("variant", "variant", ""), ("endpoint", "endpoint", ""), ("concurrency", "clients", "d"),
        ("images_per_s", "images/s", ".2f"), ("latency_ms_p50", "p50 ms", ".0f"), ("latency_ms_p99", "p99 ms", ".0f"),
        ("batch_mean", "mean batch", ".1f"), ("model_ms_per_image", "model ms/img", ".1f"),
        ("rss_mib", "RSS MiB", ".0f"),
    ]  # fmt: skip
    print(table(result["rows"], cols, "ablation"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
