"""Soak: does the server's memory (or its open files, or its threads) drift under a long mix of good and bad traffic?

    python -m bench.soak [--minutes 10] [--weights PATH] [--workers 1] [--pause-training]

mae-serve runs as a subprocess on loopback (the small ViT of bench/make_weights.py unless --weights); 8 closed-loop
clients (bench/loadgen.py) send a fixed mix, cycled: reconstruct PNG and JSON, embed CLS JSON and npz, and bad
requests that must get a 4xx (a truncated JPEG, bytes that are no image, a wrong content type, a bad parameter),
while another task opens connections that send half a request and vanish. Every --sample-s seconds it records,
for every process of the server: RSS, open file descriptors, threads. After a warm-up (the first 20% of the run:
allocator pools and caches fill) it fits a line to RSS over time and reports the drift in MiB per hour, beside
the first and last samples. A leak of one 224 x 224 float view per request (600 KiB) would show as GiB per hour.

Writes bench/results/soak.json and prints a table. Not a test: it takes minutes and its verdict is a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from typing import Any

from bench import loadgen
from bench.common import SMALL, TRAINING, machine, paused, photos, rss_kib, table, write_json
from bench.e2e import HOST, Server


def mix(port: int, pics: list[tuple[str, bytes]]) -> tuple[list[bytes], int]:
    """The request mix, cycled by the clients; and how many of its requests are bad on purpose."""
    good = []
    for name, data in pics:
        for path in ("/v1/reconstruct?mask_ratio=0.75", "/v1/reconstruct?format=json&seed=1",
                     "/v1/embed?pool=cls", "/v1/embed?format=npz"):  # fmt: skip
            good.append(loadgen.multipart_request(HOST, port, path, name, data, "image/jpeg"))
    jpeg = pics[0][1]
    bad = [
        loadgen.multipart_request(HOST, port, "/v1/embed", "cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg"),
        loadgen.multipart_request(HOST, port, "/v1/reconstruct", "noise.png", os.urandom(4096), "image/png"),
        loadgen.json_request(HOST, port, "/v1/embed", b'{"image": "not base64 at all!"}'),
        loadgen.multipart_request(HOST, port, "/v1/reconstruct?mask_ratio=1.5", "a.jpg", jpeg, "image/jpeg"),
    ]
    return good + bad, len(bad)


def sample(server: Server, t0: float) -> dict[str, float]:
    procs = server.pids()
    rss = sum(rss_kib(p).get("VmRSS", 0) for p in procs) / 1024
    fds = threads = 0
    for p in procs:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{p}/fd"))
            threads += len(os.listdir(f"/proc/{p}/task"))
    return {"t_s": time.monotonic() - t0, "rss_mib": rss, "fds": fds, "threads": threads, "processes": len(procs)}


async def vanishing_clients(port: int, stop: asyncio.Event) -> int:
    """Connections that send the head and part of a body, then close: the server must drop them, not keep them."""
    n = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection(HOST, port)
            w.write(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
            w.write(b"\x89PNG" + b"\0" * 500)
            await w.drain()
            w.close()
            n += 1
        await asyncio.sleep(0.2)
    return n


def slope_mib_per_hour(samples: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(samples) < 2:
        return float("nan")
    xs = [s["t_s"] for s in samples]
    ys = [s["rss_mib"] for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else float("nan")


async def soak(server: Server, payloads: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    samples = [sample(server, t0)]
    statuses: dict[str, int] = {}
    stop = asyncio.Event()
    vanisher = asyncio.create_task(vanishing_clients(server.port, stop))
    while time.monotonic() - t0 < args.minutes * 60:
        res = await loadgen.closed_loop(HOST, server.port, payloads, args.clients, warmup_s=0.0,
                                        duration_s=args.sample_s, min_rounds=0, max_window_s=args.sample_s)  # fmt: skip
        for r in res.records:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        samples.append(sample(server, t0))
        last = samples[-1]
        print(f"[soak] {last['t_s']:6.0f} s  RSS {last['rss_mib']:7.1f} MiB  fds {last['fds']}  threads "
              f"{last['threads']}  answers {sum(statuses.values())}", flush=True)  # fmt: skip
    stop.set()
    vanished = await vanisher
    settled = [s for s in samples if s["t_s"] >= 0.2 * args.minutes * 60]
    return {
        "samples": samples,
        "statuses": statuses,
        "vanished_connections": vanished,
        "rss_first_settled_mib": settled[0]["rss_mib"] if settled else float("nan"),
        "rss_last_mib": samples[-1]["rss_mib"],
        "rss_peak_mib": max(s["rss_mib"] for s in samples),
        "rss_drift_mib_per_hour": slope_mib_per_hour(settled),
        "fds_first_last": (samples[1]["fds"] if len(samples) > 1 else samples[0]["fds"], samples[-1]["fds"]),
        "threads_first_last": (
            samples[1]["threads"] if len(samples) > 1 else samples[0]["threads"],
            samples[-1]["threads"],
        ),  # fmt: skip
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--weights", default=str(SMALL))
    ap.add_argument("--workers", default="1")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pause-training", action="store_true")
    ap.add_argument("--out", default="soak")
    args = ap.parse_args(argv)
    server = Server("mae", args.weights, {"MAE_WORKERS": args.workers, "MAE_LOG_LEVEL": "warning"})
    server.start()
    try:
        payloads, n_bad = mix(server.port, photos(6))
        with paused(TRAINING if args.pause_training else None, max_s=args.minutes * 60 + 120):
            out = asyncio.run(soak(server, payloads, args))
    finally:
        server.stop()
    out.update(benchmark="soak", machine=machine(), settings=vars(args), bad_share=n_bad / len(payloads))
    row = {k: out[k] for k in ("rss_first_settled_mib", "rss_last_mib", "rss_peak_mib", "rss_drift_mib_per_hour")}
    row["fds"] = " -> ".join(map(str, out["fds_first_last"]))
    row["threads"] = " -> ".join(map(str, out["threads_first_last"]))
    row["answers"] = " ".join(f"{k}:{v}" for k, v in sorted(out["statuses"].items()))
    cols = [("rss_first_settled_mib", "RSS settled MiB", ".1f"), ("rss_last_mib", "RSS last MiB", ".1f"),
            ("rss_peak_mib", "peak MiB", ".1f"), ("rss_drift_mib_per_hour", "drift MiB/h", ".1f"),
            ("fds", "open fds", ""), ("threads", "threads", ""), ("answers", "answers by status", "")]  # fmt: skip
    print(table([row], cols, f"soak: {args.minutes:g} min, {args.clients} clients, workers {args.workers}"))
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
