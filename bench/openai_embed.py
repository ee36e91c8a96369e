"""POST /v1/embeddings (OpenAI's shape) against POST /v1/embed: the same server, images and pooling, 8 clients.

    python -m bench.openai_embed [--models null,small] [--repeats 3] [--clients 8] [--pause-training]

One mae-serve process per model (bench/e2e.py's harness), measured with bench/loadgen.py's closed loop and
bench/host_path.py's window. Every request carries one photo as base64 in a JSON body and asks for the CLS vector:

    v1 json        POST /v1/embed?pool=cls                 {"image": b64}                  -> JSON numbers
    v1 npz         POST /v1/embed?pool=cls&format=npz      {"image": b64}                  -> npz
    openai float   POST /v1/embeddings                     {"input": ["data:image/jpeg;base64,..."],
    openai base64  POST /v1/embeddings                      "encoding_format": float | base64, "pooling": "cls"}

The null model (compute ~0) shows the front-end's cost alone, the small ViT a served model. Each run measures
every route in turn; --repeats whole runs, medians side by side, and the ratios openai float / v1 json and openai
base64 / v1 npz. Writes bench/results/openai_embed.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from bench import loadgen
from bench.common import NULL, SMALL, TRAINING, machine, paused, photos, table, write_json
from bench.e2e import HOST, Server
from bench.host_path import add_load_arguments, json_bodies, level, medians

MODELS = {"null": NULL, "small": SMALL}
PAIRS = [("openai float", "v1 json"), ("openai base64", "v1 npz")]


def openai_bodies(server: Server, model: str, encoding: str, pics: list[tuple[str, bytes]]) -> list[bytes]:
    out = []
    for _, data in pics:
        body = {"model": model, "input": ["data:image/jpeg;base64," + base64.b64encode(data).decode()],
                "encoding_format": encoding, "pooling": "cls"}  # fmt: skip
        out.append(loadgen.json_request(HOST, server.port, "/v1/embeddings", json.dumps(body).encode()))
    return out


def one_run(args: argparse.Namespace, pics: list[tuple[str, bytes]]) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        server = Server("mae", str(MODELS[name]), {}, label=f"mae-serve {name}")
        server.start()
        try:
            model = MODELS[name].stem
            routes = [
                ("v1 json", json_bodies(server, "/v1/embed?pool=cls", pics)),
                ("openai float", openai_bodies(server, model, "float", pics)),
                ("v1 npz", json_bodies(server, "/v1/embed?pool=cls&format=npz", pics)),
                ("openai base64", openai_bodies(server, model, "base64", pics)),
            ]
            for label, payloads in routes:
                row = level(server, label, "embed", payloads, args.clients, args)
                row.update(model=name)
                rows.append(row)
                print(f"  {name:6} {label:14} {row['images_per_s']:7.1f} images/s", flush=True)
        finally:
            server.stop()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["model"], r["route"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for new, old in PAIRS:
            a, b = by[(model, new)], by[(model, old)]
            out.append({"model": model, "pair": f"{new} / {old}", "new": a["images_per_s"], "old": b["images_per_s"],
                        "ratio": a["images_per_s"] / b["images_per_s"]})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="null,small")
    add_load_arguments(ap)
    ap.add_argument("--out", default="openai_embed")
    args = ap.parse_args(argv)
    pics = photos(args.images)
    result: dict[str, Any] = {"benchmark": "openai_embed", "machine": machine(), "settings": vars(args)}
    runs = []
    for rep in range(args.repeats):  # whole runs, one after the other: medians side by side
        print(f"[bench] openai_embed: run {rep + 1} of {args.repeats}", flush=True)
        with paused(TRAINING if args.pause_training else None):
            runs.append(one_run(args, pics))
    result["rows"] = medians(runs)
    result["runs"] = runs
    result["ratios"] = ratios(result["rows"])
    write_json(args.out, result)
    cols = [("model", "model", ""), ("route", "route", ""), ("images_per_s", "images/s", ".1f"),
            ("server_cpu_ms_per_image", "server CPU ms/image", ".2f"), ("latency_ms_p50", "p50 ms", ".0f"),
            ("foreign_cpu_pct", "other %", ".0f")]  # fmt: skip
    print(table(result["rows"], cols, f"{args.clients} clients, medians of {args.repeats}"))
    print(table(result["ratios"], [("model", "model", ""), ("pair", "pair", ""), ("new", "images/s", ".1f"),
                                   ("old", "vs images/s", ".1f"), ("ratio", "ratio", ".3f")]))  # fmt: skip
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
