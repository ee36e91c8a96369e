"""Cold start: from process start (`python -m app.cli`, what `mae-serve` runs) to the first /readyz 200.

    python -m bench.cold_start [--runs 3] [--models demo,vitb] [--pause-training]

Each run is a fresh process (imports, weights, warm-up; the page cache is warm after the first run, which is
the common case of a restart), started and polled every 10 ms by tests.harness.ServerProcess. Models: `demo` =
weights/mae_demo.safetensors if it exists, else a random-init mae_vit_demo_patch16 saved like it
(bench/make_weights.py); `vitb` = the ViT-B/16 HF directory. Also reports the server's own "ready in" log line
(weights + warm-up). Writes bench/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from bench.common import (
    RESULTS,
    TRAINING,
    VITB_DIR,
    bundled_or_random_demo,
    machine,
    median,
    paused,
    table,
    write_json,
)
from tests.harness import ServerProcess


def one_run(weights: str, timeout: float) -> dict[str, Any]:
    server = ServerProcess(args=["--weights", weights, "--log-level", "info"])
    server.log_path = RESULTS / "logs" / f"cold-{server.port}.log"
    try:
        server.start()
        server.wait_ready(timeout, poll_s=0.01)
    except RuntimeError as e:
        raise SystemExit(f"{e}; see {server.log_path}") from None
    finally:
        server.stop(timeout=20)
    m = re.search(r"ready in ([0-9.]+) s", server.log())
    return {
        "ready_s": server.ready_s,
        "listening_s": server.listening_s,
        "load_and_warmup_s": float(m.group(1)) if m else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = []
    for name in args.models.split(","):
        if name == "demo":
            path, label = bundled_or_random_demo()
            targets.append(("demo", str(path), label))
        elif name == "vitb":
            targets.append(("vitb", str(VITB_DIR), "ViT-B/16 random init, HF directory"))
        else:
            targets.append((name, name, name))
    rows = []
    for key, path, label in targets:
        runs = [one_run(path, args.timeout) for _ in range(args.runs)]
        row = {
            "model": key,
            "weights": path,
            "label": label,
            "runs": runs,
            "ready_s_median": median([r["ready_s"] for r in runs]),
            "ready_s_min": min(r["ready_s"] for r in runs),
            "ready_s_max": max(r["ready_s"] for r in runs),
            "listening_s_median": median([r["listening_s"] for r in runs if r["listening_s"] is not None]),
            "load_and_warmup_s_median": median([r["load_and_warmup_s"] for r in runs if r["load_and_warmup_s"]]),
        }
        rows.append(row)
        print(f"  {key:5s} ready {row['ready_s_median']:.2f} s (median of {args.runs}; {label})", flush=True)
    return {"benchmark": "cold_start", "machine": machine(), "settings": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="process start -> /readyz 200")
    ap.add_argument("--models", default="demo,vitb", help="demo, vitb, or checkpoint paths (comma-separated)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument(
        "--pause-training",
        action="store_true",
        help="SIGSTOP the background training (bench.common.TRAINING) while measuring",
    )
    ap.add_argument("--out", default="cold_start")
    args = ap.parse_args(argv)
    with paused(TRAINING if args.pause_training else None):
        result = run(args)
    cols = [
        ("model", "model", ""),
        ("ready_s_median", "start -> ready (s, median)", ".2f"),
        ("ready_s_min", "min", ".2f"),
        ("ready_s_max", "max", ".2f"),
        ("listening_s_median", "port open (s)", ".2f"),
        ("load_and_warmup_s_median", "load + warm-up (s)", ".2f"),
        ("label", "weights", ""),
    ]
    print(table(result["rows"], cols, "cold start"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
