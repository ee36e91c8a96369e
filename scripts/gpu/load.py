#!/usr/bin/env python3
"""One load-generator process of the GPU kit: a closed loop (bench.loadgen) of keep-alive connections posting JPEGs.

    python3 scripts/gpu/load.py --port P --path '/v1/embed?pool=cls' --photos DIR --concurrency 16 \
        --start-at WALL_TIME --warmup 4 --window 8 --out result.json

Several of these run side by side (scripts/gpu/kit.py starts them), so that one client process's event loop does
not cap the rate. Each waits until --start-at (wall clock, shared by all), warms up, measures a window, and
writes its summary and the latencies of the answers inside its window to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.loadgen import closed_loop, multipart_request, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True, help="route with its query string")
    p.add_argument("--photos", required=True, help="folder of .jpg files, sent in turn")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to begin the warm-up")
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument("--offset", type=int, default=0, help="first photo (so processes send different ones)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    files = sorted(Path(a.photos).glob("*.jpg"))
    if not files:
        raise SystemExit(f"no .jpg in {a.photos}")
    files = files[a.offset % len(files) :] + files[: a.offset % len(files)]
    payloads = [multipart_request(a.host, a.port, a.path, f.name, f.read_bytes(), "image/jpeg") for f in files]
    time.sleep(max(0.0, a.start_at - time.time()))
    wall0, perf0 = time.time(), time.perf_counter()
    res = asyncio.run(
        closed_loop(
            a.host,
            a.port,
            payloads,
            a.concurrency,
            warmup_s=a.warmup,
            duration_s=a.window,
            min_rounds=0.0,
            max_window_s=a.window,
            request_timeout_s=a.request_timeout,
        )
    )
    lo, hi = res.window
    out = summarize(res)
    inside = [r for r in res.records if r.status == 200 and lo <= r.end <= hi]
    out["latencies_ms"] = [round((r.end - r.start) * 1e3, 3) for r in inside]
    out["window_wall"] = [wall0 + (lo - perf0), wall0 + (hi - perf0)]
    out["concurrency"] = a.concurrency
    Path(a.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
