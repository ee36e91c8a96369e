"""Per-source breakdown of an evaluation: does the model beat the baselines on photos unlike its training set?

A file's source is the first folder of its path under the evaluated folder (`val_cross/scikit-image/coffee.jpg`
-> `scikit-image`, the layout of photoset.build); for a file directly in the folder, the part of its name before
the first "-" (`mate-LadyBird.jpg` -> `mate`, the shared set's naming).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any


def source_of(name: str) -> str:
    parts = PurePosixPath(name).parts
    if len(parts) > 1:
        return parts[0]
    stem = PurePosixPath(name).stem
    return stem.split("-", 1)[0] if "-" in stem else "(none)"


def per_source(images: Sequence[dict[str, Any]], methods: Sequence[str], reference: str = "bilinear") -> dict:
    """{source: {num_images, pairs, mean_psnr{method}, delta_vs_<ref>_db, win_rate_vs_<ref>}} from the report's
    per-image rows (each with `psnr` and `mse_per_seed` per method)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in images:
        groups.setdefault(source_of(r["file"]), []).append(r)
    out = {}
    for source in sorted(groups):
        rows = groups[source]
        mean = {m: sum(r["psnr"][m] for r in rows) / len(rows) for m in methods}
        pairs = [
            (a, b) for r in rows for a, b in zip(r["mse_per_seed"]["mae"], r["mse_per_seed"][reference], strict=True)
        ]
        out[source] = {
            "num_images": len(rows),
            "pairs": len(pairs),
            "mean_psnr": mean,
            f"delta_vs_{reference}_db": mean["mae"] - mean[reference],
            f"win_rate_vs_{reference}": sum(a < b for a, b in pairs) / len(pairs),
        }
    return out


def format_per_source(by_source: dict[str, Any], methods: Sequence[str], reference: str = "bilinear") -> str:
    lines = [
        "| source | images | " + " | ".join(f"{m} PSNR" for m in methods) + f" | mae - {reference} (dB) | "
        f"mae beats {reference} |",
        "|---|---:|" + "---:|" * len(methods) + "---:|---:|",
    ]
    for source, s in by_source.items():
        lines.append(
            f"| {source} | {s['num_images']} | "
            + " | ".join(f"{s['mean_psnr'][m]:.2f}" for m in methods)
            + f" | {s[f'delta_vs_{reference}_db']:+.2f} | {100 * s[f'win_rate_vs_{reference}']:.0f}% of {s['pairs']} |"
        )
    return "\n".join(lines)


def picture_rows(names: Sequence[str], per_source: int) -> list[int]:
    """Indices of the first `per_source` names of every source, source by source (rows for samples.png)."""
    seen: dict[str, int] = {}
    rows = []
    for i, name in enumerate(names):
        source = source_of(name)
        if seen.get(source, 0) < per_source:
            seen[source] = seen.get(source, 0) + 1
            rows.append(i)
    return sorted(rows, key=lambda i: (source_of(names[i]), i))


def picture_first(names: Sequence[str], per_source: int) -> list[int]:
    """An order of all indices with the picture rows first (evaluate() draws the first N images)."""
    rows = picture_rows(names, per_source)
    chosen = set(rows)
    return rows + [i for i in range(len(names)) if i not in chosen]
