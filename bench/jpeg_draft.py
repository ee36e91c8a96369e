"""MAE_JPEG_DRAFT: what decoding JPEGs at a reduced DCT scale costs in fidelity and saves in time.

    python -m bench.jpeg_draft [--size 224] [--repeats 7] [--photos DIR]

For every JPEG photo: the model's input (size x size uint8, resize=squash) by the exact path (full decode +
bicubic resize: the reference preprocessing, the default) and by the draft path (libjpeg's scaled decode, never
below `size`, then the same resize); PSNR and the largest pixel difference between the two, and the median time of
each path (decode + preprocess, one thread). Writes bench/results/jpeg_draft.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from app.serving import imaging
from bench.common import PHOTOS, machine, median, median_seconds, table, write_json


def model_input(data: bytes, size: int, draft: bool) -> np.ndarray:
    return imaging.load(data, size, "squash", 10**9, min_side=size if draft else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    rows = []
    for path in files:
        data = path.read_bytes()
        exact, draft = model_input(data, args.size, False), model_input(data, args.size, True)
        diff = exact.astype(np.int16) - draft.astype(np.int16)
        mse = float(np.mean((diff / 255.0) ** 2))
        w, h = imaging.decode(data, 10**9).size
        rows.append(
            {
                "photo": path.name,
                "pixels": f"{w}x{h}",
                "psnr_db": 10 * math.log10(1 / mse) if mse else float("inf"),
                "max_abs_diff": int(np.abs(diff).max()),
                "exact_ms": median_seconds(args.repeats, model_input, data, args.size, False) * 1e3,
                "draft_ms": median_seconds(args.repeats, model_input, data, args.size, True) * 1e3,
            }
        )
    summary = {
        "photos": len(rows),
        "psnr_db_min": min(r["psnr_db"] for r in rows),
        "psnr_db_median": median([r["psnr_db"] for r in rows]),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "exact_ms_median": median([r["exact_ms"] for r in rows]),
        "draft_ms_median": median([r["draft_ms"] for r in rows]),
    }
    return {"benchmark": "jpeg_draft", "machine": machine(), "settings": vars(args), "rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--photos", default=str(PHOTOS))
    ap.add_argument("--out", default="jpeg_draft")
    args = ap.parse_args(argv)
    result = run(args)
    cols = [
        ("photo", "photo", ""),
        ("pixels", "size", ""),
        ("psnr_db", "draft vs exact PSNR (dB)", ".1f"),
        ("max_abs_diff", "max |diff| (of 255)", "d"),
        ("exact_ms", "exact (ms)", ".2f"),
        ("draft_ms", "draft (ms)", ".2f"),
    ]
    print(table(result["rows"], cols, f"JPEG draft decoding at {args.size} px"))
    print(result["summary"])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
