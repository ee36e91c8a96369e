"""Compare training runs (or weights files) by what the model card reports: cross-source and in-source PSNR.

    python scripts/compare_runs.py runs/pilot_A runs/pilot_B weights/mae_demo.safetensors [--seeds 0 1 2 3 4]

For each run folder (its model.safetensors) or weights file: the masked-patch PSNR of the model and of bilinear
interpolation at a 75 % mask on data/photos/val_cross (sources never trained on), data/photos/val_in (held-out
photos of the training sources) and ../shared/datasets/photos/val (the old 6-photo val), the margin, and how often
the model beats bilinear over (image, mask) pairs. Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import formats as checkpoint  # noqa: E402
from model.evaluate import evaluate, load_images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SETS = {
    "cross": REPO / "data/photos/val_cross",
    "in": REPO / "data/photos/val_in",
    "old_val": REPO.parent / "shared/datasets/photos/val",
}


def weights_of(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def steps_of(path: Path) -> str:
    csv = path / "loss.csv"
    if not path.is_dir() or not csv.exists():
        return ""
    lines = csv.read_text().strip().splitlines()
    return lines[-1].split(",")[0] if len(lines) > 1 else "0"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders or weights files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cache: dict[tuple[str, int], tuple[list[str], torch.Tensor]] = {}
    results = {}
    header = (
        "| run | params | steps | cross mae | cross bilinear | cross margin | cross wins | in mae | in margin "
        "| old val mae | old val margin |"
    )
    print(header + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        loaded = checkpoint.load(weights_of(run))
        size = loaded.config.img_size
        row: dict[str, dict] = {}
        t0 = time.perf_counter()
        for name, folder in SETS.items():
            if not folder.exists():
                continue
            if (name, size) not in cache:
                cache[(name, size)] = load_images(folder, size)
            names, images = cache[(name, size)]
            report, _ = evaluate(loaded.model, images, names, seeds=args.seeds)
            row[name] = {
                "mae": report["overall"]["mae"]["mean_psnr"],
                "bilinear": report["overall"]["bilinear"]["mean_psnr"],
                "margin": report["model_vs_baselines"]["bilinear"]["delta_mean_psnr_db"],
                "win_rate": report["model_vs_baselines"]["bilinear"]["win_rate"],
                "by_source": report["by_source"],
            }
        results[str(run)] = {"params": loaded.model.num_parameters(), "steps": steps_of(run), **row}
        c, i, o = row.get("cross", {}), row.get("in", {}), row.get("old_val", {})

        def f(d: dict, k: str, fmt: str = "{:.2f}") -> str:
            return fmt.format(d[k]) if k in d else "-"

        print(
            f"| {run} | {loaded.model.num_parameters() / 1e6:.2f} M | {steps_of(run)} | {f(c, 'mae')} | "
            f"{f(c, 'bilinear')} | {f(c, 'margin', '{:+.2f}')} | {f(c, 'win_rate', '{:.0%}')} | {f(i, 'mae')} | "
            f"{f(i, 'margin', '{:+.2f}')} | {f(o, 'mae')} | {f(o, 'margin', '{:+.2f}')} |",
            flush=True,
        )
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
