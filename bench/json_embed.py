"""Embeddings with every patch token as JSON: what serialising one ViT-B image's answer costs.

    python -m bench.json_embed [--dim 768] [--grid 14] [--repeats 31]

The body `/v1/embed?pool=all` answers (app.http.routes.embed's `_json`: cls, mean, 196 patch tokens and their indices,
ViT-B's 768 wide), serialised by app.http.jsonio (orjson, numpy arrays as they are), against the way most servers do
it and this one did before: `tolist()` then the standard library's `json.dumps`. One thread; median of
`--repeats` calls each, side by side. Writes bench/results/json_embed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np

from app.http.jsonio import dumps
from app.http.routes.embed import _json
from app.serving.pipeline import EmbedAnswer
from bench.common import machine, median_seconds, table, write_json
from model.outputs import Embedding


def answer(dim: int, grid: int) -> EmbedAnswer:
    rng = np.random.default_rng(0)  # encoder outputs after the final LayerNorm: about unit scale, like these
    n = grid * grid
    tokens = rng.standard_normal((n + 1, dim), dtype=np.float32)
    e = Embedding(tokens[0], tokens[1:].mean(0), tokens[1:], np.arange(n, dtype=np.int64), (grid, grid))
    model = SimpleNamespace(name="vit-b", config=SimpleNamespace(num_patches=n))
    return EmbedAnswer.of(model, e, None)  # type: ignore[arg-type]


def stdlib(body: dict[str, Any]) -> bytes:
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}
    return json.dumps(plain).encode()


def serialise(encode: Any, r: EmbedAnswer, pool: str) -> bytes:
    """Build the body and serialise it, as the route does per image."""
    return encode(_json(r, pool))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--out", default="json_embed")
    args = ap.parse_args(argv)
    r = answer(args.dim, args.grid)
    rows = []
    for pool in ("all", "patches", "cls"):
        for name, encode in (("app.http.jsonio (orjson)", dumps), ("tolist + json.dumps", stdlib)):
            ms = 1e3 * median_seconds(args.repeats, serialise, encode, r, pool)
            out = serialise(encode, r, pool)
            assert json.loads(out)["dim"] == args.dim
            rows.append({"pool": pool, "serialiser": name, "ms_per_image": ms, "bytes": len(out)})
    result = {"benchmark": "json_embed", "machine": machine(), "settings": vars(args), "rows": rows}
    cols = [("pool", "pool", ""), ("serialiser", "serialiser", ""), ("ms_per_image", "ms / image", ".2f"),
            ("bytes", "bytes", "")]  # fmt: skip
    print(table(rows, cols, f"one image's embed answer as JSON ({args.grid}x{args.grid} patches x {args.dim})"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
