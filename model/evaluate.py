"""How well does an MAE fill in masked patches, compared with simple fills on exactly the same masks?

    python -m model.evaluate --weights weights/mae_demo.safetensors --data ../shared/datasets/photos/val \
        [--mask-ratio 0.75] [--seeds 0 1 2] [--out eval/demo]

Protocol. Every image is squash-resized to the model's img_size (antialiased bilinear, as in training) into [0, 1].
For each seed, one random mask is drawn with `model.masking.random_masking_spec(L, mask_ratio, seed)` and used for
every image: the same seed and ratio sent to the server reproduce any row here. Three methods fill the same masked
patches:

* ``mae``: the model's own reconstruction (`ReconstructBatch.reconstruction`, clipped to [0, 1]), not the paste.
* ``mean_fill``: every masked pixel is the mean colour (per channel) of the visible pixels of that image.
* ``bilinear``: linear interpolation along rows and columns from the visible pixels (see `bilinear_fill`).

Metric: MSE in [0, 1] pixel space over the masked patches only (all channels, every masked pixel weighted equally,
the definition of `ReconstructBatch.mse`), and PSNR = 10 log10(1 / MSE). An MSE below 1e-10 counts as 1e-10, so a
perfect fill scores PSNR_CAP_DB = 100 dB instead of infinity (JSON has no inf).

Aggregation. Per image, the MSE is the mean over seeds (every seed masks the same number of patches) and its PSNR is
taken from that mean. Overall we give both `mean_psnr` (mean over images of per-image PSNR: the HEADLINE, the usual
image-restoration convention, which no single hard image dominates) and `psnr_of_mean_mse` (PSNR of the mean MSE
over images: pixel-weighted, dominated by the hardest images). `model_vs_baselines` gives the headline difference in
dB and how often the model beats each baseline over all (image, seed) pairs.

Caveat: a `norm_pix_loss` model reconstructs each masked patch with that patch's true mean and variance (as the
official visualisations do), so its numbers are flattered against the baselines; the report flags it.

Writes to --out: metrics.json, metrics.md and samples.png (rows = images, columns = original / masked /
reconstruction / paste / mean fill / bilinear, the baselines pasted over the visible pixels like the paste column).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from model import formats as checkpoint
from model.data import list_images, load_rgb, resize_to
from model.family import MaskedAutoencoder
from model.masking import Masking, random_masking_spec
from model.outputs import PSNR_CAP_DB, psnr  # the one definition of PSNR (the API's too)
from photoset.by_source import format_per_source, per_source, picture_first, picture_rows

METHODS = ("mae", "mean_fill", "bilinear")
HEADLINE = "mean_psnr"


# ---------------------------------------------------------------------------------------------------- metrics
def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, L) patch mask (1 = masked) -> (N, 1, H, W) pixel mask."""
    m = mask.float().view(mask.shape[0], 1, grid[0], 1, grid[1], 1)
    return m.expand(-1, -1, -1, patch_size, -1, patch_size).reshape(
        mask.shape[0], 1, grid[0] * patch_size, grid[1] * patch_size
    )


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N,) mean squared error over the masked patches (the definition of `ReconstructBatch.mse`)."""
    per_patch = rearrange(
        (pred.float() - target.float()) ** 2, "n c (h p) (w q) -> n (h w) (p q c)", p=patch_size, q=patch_size
    )
    per_patch = per_patch.mean(dim=-1) * mask.float()
    return per_patch.sum(dim=1) / mask.float().sum(dim=1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------- baselines
def _grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    return (h // patch_size, w // patch_size)


def mean_fill(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Masked pixels := the per-channel mean of the visible pixels of the same image; visible pixels kept.

    Every visible patch has the same number of pixels, so this is also the mean of the visible patches' means.
    """
    known = 1.0 - pixel_mask(mask, _grid(images, patch_size), patch_size)  # (N, 1, H, W)
    mean = (images * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    return images * known + mean * (1.0 - known)


def _nearest_known(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """known (..., W) bool -> indices of the nearest known position at-or-before / at-or-after each position.

    -1 (before) or W (after) where there is none.
    """
    width = known.shape[-1]
    idx = torch.arange(width, device=known.device).expand_as(known)
    before = torch.where(known, idx, -1).cummax(dim=-1).values
    after = torch.where(known, idx, width).flip(-1).cummin(dim=-1).values.flip(-1)
    return before, after


class _Line(NamedTuple):
    """Linear interpolation along the last axis; leading (2, ...) fields hold (before, after)."""

    interp: torch.Tensor  # (N, C, H, W) value interpolated between the two neighbours (meaningful if bracketed)
    bracketed: torch.Tensor  # (N, H, W) a known pixel exists on both sides
    span: torch.Tensor  # (N, H, W) distance between the two neighbours
    values: torch.Tensor  # (2, N, C, H, W) the neighbours' values
    has: torch.Tensor  # (2, N, H, W) whether each neighbour exists
    dist: torch.Tensor  # (2, N, H, W) distance to each neighbour

    def transposed(self) -> _Line:
        return _Line(*(t.transpose(-1, -2) for t in self))


def _line_fill(images: torch.Tensor, known: torch.Tensor) -> _Line:
    """Interpolate (N, C, H, W) images along their rows from the known pixels of a (N, H, W) map."""
    n, c, h, w = images.shape
    before, after = _nearest_known(known)  # (N, H, W)
    has_b, has_a = before >= 0, after < w

    def gather(i: torch.Tensor) -> torch.Tensor:
        return images.gather(-1, i.clamp(0, w - 1)[:, None].expand(n, c, h, w))

    v_b, v_a = gather(before), gather(after)
    pos = torch.arange(w, device=images.device).expand(n, h, w)
    span = (after - before).clamp(min=1)
    interp = v_b + (v_a - v_b) * ((pos - before).float() / span.float())[:, None]
    d_b = torch.where(has_b, pos - before, 0).float()
    d_a = torch.where(has_a, after - pos, 0).float()
    return _Line(
        interp,
        has_b & has_a,
        span.float(),
        torch.stack([v_b, v_a]),
        torch.stack([has_b, has_a]),
        torch.stack([d_b, d_a]),
    )


def bilinear_fill(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fill masked pixels by linear interpolation from the visible pixels along rows and columns.

    Known data = every pixel of every visible patch (the same information the model gets). For a masked pixel:

    1. Along its row, take the nearest visible pixel to the left (x_l) and to the right (x_r). If both exist, the
       row estimate is the linear interpolation between them, h = I(x_l) + (I(x_r) - I(x_l)) (x - x_l) / (x_r - x_l),
       trusted with weight 1 / (x_r - x_l). The same along its column gives v with weight 1 / (y_d - y_u).
       The fill is the weighted mean of the estimates that exist: linear in x and linear in y, and the direction
       whose known pixels are closer counts more. Any such fill is exact on an image that is linear in (x, y).
    2. If neither its row nor its column brackets it (a hole touching the image border), it is extrapolated as a
       constant: the inverse-distance (1/d) weighted mean of the nearest visible pixel in each of the four axis
       directions that has one.
    3. If its row and column hold no visible pixel at all, it gets the image's mean visible colour (`mean_fill`).

    Deterministic, per channel, O(pixels); visible pixels are returned unchanged.
    """
    grid = _grid(images, patch_size)
    masked_px = pixel_mask(mask, grid, patch_size)[:, 0] > 0.5  # (N, H, W)
    known = ~masked_px
    x = images.float()
    row = _line_fill(x, known)
    col = _line_fill(x.transpose(-1, -2), known.transpose(-1, -2)).transposed()

    # Step 1: interpolation along rows and/or columns, weighted by 1 / span.
    w_h = row.bracketed.float() / row.span
    w_v = col.bracketed.float() / col.span
    w_sum = (w_h + w_v)[:, None]
    interp = (row.interp * w_h[:, None] + col.interp * w_v[:, None]) / w_sum.clamp(min=1e-12)

    # Step 2: one-sided neighbours only -> inverse-distance weighted constant extrapolation.
    vals = torch.cat([row.values, col.values])  # (4, N, C, H, W)
    has = torch.cat([row.has, col.has]).float()  # (4, N, H, W)
    dist = torch.cat([row.dist, col.dist]).clamp(min=1)
    wts = (has / dist)[:, :, None]
    extrap = (vals * wts).sum(0) / wts.sum(0).clamp(min=1e-12)

    # Step 3: nothing in the row or column -> mean colour of the visible pixels.
    fallback = mean_fill(x, mask, patch_size)
    fill = torch.where(w_sum > 0, interp, torch.where(wts.sum(0) > 0, extrap, fallback))
    return torch.where(masked_px[:, None], fill, x).clamp(0, 1)


BASELINES = {"mean_fill": mean_fill, "bilinear": bilinear_fill}


# ---------------------------------------------------------------------------------------------------- running
def load_images(folder: str | Path, img_size: int, limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Names relative to `folder` and (N, 3, img_size, img_size) images in [0, 1], squash-resized."""
    files = list_images(folder)[:limit] if limit else list_images(folder)
    names = [str(p.relative_to(folder)) for p in files]
    return names, torch.stack([resize_to(load_rgb(p), img_size) for p in files])


def evaluate(
    model: MaskedAutoencoder,
    images: torch.Tensor,
    names: Sequence[str],
    *,
    mask_ratio: float = 0.75,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    keep_for_picture: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run the protocol of the module docstring. Returns the report and, for the first `keep_for_picture` images
    under the first seed, the images of each column (for `make_picture`)."""
    if not seeds:
        raise ValueError("give at least one seed")
    if len(names) != images.shape[0]:
        raise ValueError(f"{len(names)} names for {images.shape[0]} images")
    c = model.config
    model.eval()
    num_patches = c.num_patches
    p = c.patch_size
    # per_seed[method][i][s] = MSE of image i under seed s
    per_seed: dict[str, list[list[float]]] = {m: [[] for _ in names] for m in METHODS}
    columns: dict[str, list[torch.Tensor]] = {}
    len_keep = 0
    for s_i, seed in enumerate(seeds):
        spec = random_masking_spec(num_patches, mask_ratio, seed)  # one mask per seed, shared by all images
        len_keep = spec.len_keep
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].float()
            masking = Masking(spec.noise.expand(batch.shape[0], -1).clone(), spec.len_keep)
            out = model.reconstruct(batch, masking)
            fills = {"mae": out.reconstruction}
            for name, fn in BASELINES.items():
                fills[name] = fn(batch, out.mask, p)
            for m in METHODS:
                for j, v in enumerate(masked_mse(fills[m], batch, out.mask, p).tolist()):
                    per_seed[m][start + j].append(v)
            n_keep = max(0, min(keep_for_picture - start, batch.shape[0]))
            if s_i == 0 and n_keep:
                pm = pixel_mask(out.mask[:n_keep], out.grid, p)
                cols = {
                    "original": batch[:n_keep],
                    "masked": out.masked[:n_keep],
                    "reconstruction": out.reconstruction[:n_keep],
                    "paste": out.paste[:n_keep],
                    "mean fill": fills["mean_fill"][:n_keep] * pm + batch[:n_keep] * (1 - pm),
                    "bilinear": fills["bilinear"][:n_keep] * pm + batch[:n_keep] * (1 - pm),
                }
                for k, v in cols.items():
                    columns.setdefault(k, []).append(v.float().cpu())

    per_image: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        mse = {m: sum(per_seed[m][i]) / len(seeds) for m in METHODS}
        per_image.append(
            {
                "file": name,
                "mse": mse,
                "psnr": {m: psnr(v) for m, v in mse.items()},
                "mse_per_seed": {m: per_seed[m][i] for m in METHODS},
            }
        )
    overall = {}
    for m in METHODS:
        mses = [r["mse"][m] for r in per_image]
        psnrs = [r["psnr"][m] for r in per_image]
        mean_mse = sum(mses) / len(mses)
        overall[m] = {
            "mean_psnr": sum(psnrs) / len(psnrs),
            "psnr_of_mean_mse": psnr(mean_mse),
            "mean_mse": mean_mse,
            "min_psnr": min(psnrs),
            "max_psnr": max(psnrs),
        }
    pairs = len(names) * len(seeds)
    versus = {
        b: {
            "delta_mean_psnr_db": overall["mae"]["mean_psnr"] - overall[b]["mean_psnr"],
            "delta_psnr_of_mean_mse_db": overall["mae"]["psnr_of_mean_mse"] - overall[b]["psnr_of_mean_mse"],
            "win_rate": sum(
                a < o for i in range(len(names)) for a, o in zip(per_seed["mae"][i], per_seed[b][i], strict=True)
            )
            / pairs,
        }
        for b in BASELINES
    }
    report = {
        "architecture": c.name,
        "img_size": c.img_size,
        "patch_size": p,
        "num_patches": num_patches,
        "mask_ratio": mask_ratio,
        "len_keep": len_keep,
        "num_masked": num_patches - len_keep,
        "seeds": list(seeds),
        "num_images": len(names),
        "methods": list(METHODS),
        "headline": HEADLINE,
        "psnr_cap_db": PSNR_CAP_DB,
        "norm_pix_loss_uses_true_patch_stats": bool(c.norm_pix_loss),
        "overall": overall,
        "model_vs_baselines": versus,
        "by_source": per_source(per_image, METHODS),
        "images": per_image,
    }
    return report, {k: torch.cat(v) for k, v in columns.items()}


# ---------------------------------------------------------------------------------------------------- output
def format_table(report: dict[str, Any], per_image: bool = True) -> str:
    """A markdown table (it also reads well on a terminal): overall first, then one row per image."""
    o = report["overall"]
    lines = [
        f"MAE {report['architecture']}: {report['num_images']} images x {len(report['seeds'])} seeds "
        f"{report['seeds']}, mask ratio {report['mask_ratio']} ({report['num_masked']}/{report['num_patches']} "
        f"patches masked). Masked-patch MSE in [0, 1] pixels; PSNR capped at {report['psnr_cap_db']:.0f} dB.",
        "",
        "| method | mean PSNR (dB, headline) | PSNR of mean MSE (dB) | mean MSE | min PSNR | max PSNR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        r = o[m]
        lines.append(
            f"| {m} | {r['mean_psnr']:.2f} | {r['psnr_of_mean_mse']:.2f} | {r['mean_mse']:.5f} | "
            f"{r['min_psnr']:.2f} | {r['max_psnr']:.2f} |"
        )
    lines.append("")
    for b, v in report["model_vs_baselines"].items():
        lines.append(
            f"- mae vs {b}: {v['delta_mean_psnr_db']:+.2f} dB (mean PSNR), "
            f"{v['delta_psnr_of_mean_mse_db']:+.2f} dB (PSNR of mean MSE), "
            f"lower MSE on {100 * v['win_rate']:.0f}% of (image, seed) pairs"
        )
    if report["norm_pix_loss_uses_true_patch_stats"]:
        lines.append("- WARNING: norm_pix_loss model: masked patches use their true mean/variance (flattered).")
    if len(report.get("by_source", {})) > 1:
        lines += ["", "Per source (a file's first folder, or its name before the first '-'):", ""]
        lines.append(format_per_source(report["by_source"], METHODS))
    if per_image:
        lines += ["", "| image | " + " | ".join(f"{m} PSNR" for m in METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
        for r in report["images"]:
            lines.append(f"| {r['file']} | " + " | ".join(f"{r['psnr'][m]:.2f}" for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def make_picture(
    columns: dict[str, torch.Tensor], captions: Sequence[dict[str, str]] | None = None, min_tile: int = 128
) -> Image.Image:
    """A grid: one row per image, one column per entry of `columns` ((N, 3, H, W) in [0, 1]), labelled on top.

    Small images are enlarged (nearest neighbour, so patch edges stay sharp) to at least `min_tile` pixels so the
    labels fit. `captions[i][column]` is written under a tile.
    """
    names = list(columns)
    n, _, h, w = columns[names[0]].shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    font = _font(12)
    pad, head, foot = 4, 18, 16 if captions else 0
    canvas = Image.new("RGB", (pad + len(names) * (tw + pad), head + n * (th + foot + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        x0 = pad + j * (tw + pad)
        draw.text((x0 + 2, 3), name, fill="black", font=font)
        for i in range(n):
            arr = (columns[name][i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
            tile = Image.fromarray(arr, "RGB").resize((tw, th), Image.Resampling.NEAREST)
            y0 = head + i * (th + foot + pad)
            canvas.paste(tile, (x0, y0))
            if captions and name in captions[i]:
                draw.text((x0 + 2, y0 + th + 1), captions[i][name][: max(4, tw // 7)], fill="black", font=font)
    return canvas


def picture_captions(report: dict[str, Any], n: int) -> list[dict[str, str]]:
    """Under each row: the file name, and first-seed PSNR of each method under its column."""
    out = []
    for r in report["images"][:n]:
        first = {m: psnr(r["mse_per_seed"][m][0]) for m in METHODS}
        out.append(
            {
                "original": Path(r["file"]).name,
                "reconstruction": f"{first['mae']:.1f} dB",
                "mean fill": f"{first['mean_fill']:.1f} dB",
                "bilinear": f"{first['bilinear']:.1f} dB",
            }
        )
    return out


def write_outputs(report: dict[str, Any], columns: dict[str, torch.Tensor], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "picture": out / "samples.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text("# MAE reconstruction vs baselines\n\n" + format_table(report))
    if columns:
        n = next(iter(columns.values())).shape[0]
        make_picture(columns, picture_captions(report, n)).save(paths["picture"])
    else:
        del paths["picture"]
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a weights file model.formats can load")
    ap.add_argument("--data", required=True, help="image folder (searched recursively)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one random mask per seed")
    ap.add_argument("--out", default=None, help="folder for metrics.json, metrics.md, samples.png (none: print only)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by path)")
    ap.add_argument("--rows", type=int, default=6, help="images shown in samples.png")
    ap.add_argument(
        "--rows-per-source",
        type=int,
        default=0,
        help="instead of the first --rows images, show the first N of every source (see photoset/by_source.py)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        loaded = checkpoint.load(args.weights)  # any supported format: own, official, HF, timm
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if not loaded.config.has_decoder:
        raise SystemExit(f"{args.weights}: encoder-only weights have no pixel decoder; nothing to evaluate")
    names, images = load_images(args.data, loaded.config.img_size, args.limit)
    rows = args.rows
    if args.rows_per_source:
        order = picture_first(names, args.rows_per_source)
        names, images = [names[i] for i in order], images[order]
        rows = len(picture_rows(names, args.rows_per_source))
    report, columns = evaluate(
        loaded.model,
        images,
        names,
        mask_ratio=args.mask_ratio,
        seeds=args.seeds,
        batch_size=args.batch_size,
        keep_for_picture=rows if args.out else 0,
    )
    report = {
        "weights": str(args.weights),
        "weights_format": loaded.format,
        "weights_sha256": loaded.sha256,
        "weights_notes": list(loaded.notes),
        "data": str(args.data),
        **report,
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    print(format_table(report), end="")
    if args.out:
        for kind, path in write_outputs(report, columns, args.out).items():
            print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
