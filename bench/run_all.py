"""All four benchmarks with modest defaults, then the targets table and the plot: `python -m bench.run_all`
(or `make bench`). About 9 minutes on the 2-core machine of BENCHMARKS.md.

Steps (each its own process; each pauses the background training for its own window, < 6 minutes, when
--pause-training is given, and resumes it after):
  1. bench.make_weights                        the random-init ViT-B/16 HF directory (once)
  2. bench.ceiling                             bare model, batch 1..32, the engine's kernels -> ceiling.json
  3. bench.ceiling --kernels stock             bare model on stock PyTorch, batch 1 and 4    -> ceiling_stock.json
  4. bench.e2e                                 mae-serve (+ the bare model around each level),
                                               baseline-async, baseline-sync                 -> e2e.json
  5. bench.ceiling (batch 1 and 4 again)       the ceiling after the load run (drift check)   -> ceiling_after.json
  6. bench.cold_start                          bundled model and ViT-B, 3 starts each        -> cold_start.json
  7. bench.report                              targets, Markdown tables, e2e.png             -> summary.json

--quick: a smoke run in about two minutes (short windows, fewer levels, one start each), for checking the
scripts, not for quoting; it writes *_quick.json and no report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import PYTHON, REPO


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run (about two minutes; *_quick.json); numbers not for quoting"
    )
    ap.add_argument("--pause-training", action="store_true", help="SIGSTOP the background training per step")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: ceiling,stock,e2e,after,cold")
    args = ap.parse_args(argv)
    pause = ["--pause-training"] if args.pause_training else []
    skip = set(args.skip.split(","))
    q = args.quick
    sfx = "_quick" if q else ""  # a smoke run never overwrites the results BENCHMARKS.md quotes
    steps: list[tuple[str, list[str]]] = [("weights", ["bench.make_weights"])]
    if "ceiling" not in skip:
        steps.append(("ceiling", ["bench.ceiling", "--min-time", "0.3" if q else "1.0", "--out", "ceiling" + sfx,
                                  "--batch-sizes", "1,4" if q else "1,2,4,8,16,32", *pause]))  # fmt: skip
    if "stock" not in skip:
        steps.append(("stock", ["bench.ceiling", "--kernels", "stock", "--batch-sizes", "1" if q else "1,4",
                                "--min-time", "0.3" if q else "1.5", "--out", f"ceiling_stock{sfx}",
                                *pause]))  # fmt: skip
    if "e2e" not in skip:
        e2e = ["bench.e2e", "--out", "e2e" + sfx, *pause]
        if q:
            e2e += ["--concurrency", "1,8", "--baseline-concurrency", "8", "--sync-concurrency", "8",
                    "--duration", "2", "--warmup", "1", "--retries", "0", "--paired-ceiling", "1"]  # fmt: skip
        steps.append(("e2e", e2e))
    if "after" not in skip:
        steps.append(("after", ["bench.ceiling", "--batch-sizes", "1,4", "--min-time", "0.3" if q else "1.5",
                                "--out", "ceiling_after" + sfx, *pause]))  # fmt: skip
    if "cold" not in skip:
        steps.append(("cold", ["bench.cold_start", "--runs", "1" if q else "3", "--out", "cold_start" + sfx, *pause]))
    if not q:
        steps.append(("report", ["bench.report"]))
    t0 = time.perf_counter()
    for name, cmd in steps:
        t = time.perf_counter()
        print(f"\n[run_all] {name}: python -m {' '.join(cmd)}", flush=True)
        rc = subprocess.run([PYTHON, "-m", *cmd], cwd=REPO).returncode
        print(f"[run_all] {name}: {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            sys.exit(f"[run_all] step {name} failed with exit code {rc}")
    print(f"\n[run_all] all done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
