"""The same server under different process environments, side by side: what OpenMP's idle policy and the like cost.

    python -m bench.runtime_env [--model null|small|vitb] [--variant NAME:K=V,K=V ...] [--repeats 3]

Each variant is one mae-serve subprocess started with those variables added (an empty list = mae-serve's own
defaults), driven like bench/host_path.py's null part (its load arguments: 8 clients, multipart photos) on
reconstruct PNG and embed CLS JSON. Every repeat runs all variants in turn; the table gives medians of images/s
and the server's CPU-ms per image. Writes bench/results/runtime_env_<model>.json.

The default variants are the ones BENCHMARKS.md compares: mae-serve as it starts (OMP_WAIT_POLICY=PASSIVE, malloc
tuned) and with libgomp's own spinning back (GOMP_SPINCOUNT=300000).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import NULL, SMALL, TRAINING, VITB_DIR, machine, median, paused, photos, table, write_json
from bench.e2e import Server
from bench.host_path import HEADLINE_ROUTES, add_load_arguments, serve_routes

MODELS = {"null": NULL, "small": SMALL, "vitb": VITB_DIR}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in pairs.split(",") if kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="null")
    ap.add_argument("--variant", action="append", help="NAME:K=V,K=V (repeatable)")
    ap.add_argument("--out", help="results file name (default runtime_env_<model>)")
    add_load_arguments(ap)
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in (args.variant or ["mae-serve:", "libgomp spin:GOMP_SPINCOUNT=300000"]))
    pics = photos(args.images)
    runs: dict[str, list[dict[str, Any]]] = {}
    with paused(TRAINING if args.pause_training else None):
        for rep in range(args.repeats):
            print(f"[bench] runtime env ({args.model}): run {rep + 1} of {args.repeats}", flush=True)
            for name, env in variants.items():
                server = Server("mae", str(MODELS[args.model]), env, label=name)
                for row in serve_routes(server, HEADLINE_ROUTES, pics, args):
                    runs.setdefault(f"{name}|{row['route']}", []).append(row)
    rows = []
    for key, rs in runs.items():
        name, label = key.split("|")
        rows.append({"variant": name, "env": variants[name], "route": label,
                     "images_per_s": median([r["images_per_s"] for r in rs]),
                     "server_cpu_ms_per_image": median([r["server_cpu_ms_per_image"] for r in rs]),
                     "runs_images_per_s": [r["images_per_s"] for r in rs]})  # fmt: skip
    cols = [("variant", "variant", ""), ("route", "route", ""), ("images_per_s", "images/s", ".1f"),
            ("server_cpu_ms_per_image", "server CPU ms/image", ".2f")]  # fmt: skip
    print(table(rows, cols))
    result = {"benchmark": "runtime_env", "machine": machine(), "model": args.model, "rows": rows, "runs": runs}
    write_json(args.out or f"runtime_env_{args.model}", result)


if __name__ == "__main__":
    main()
