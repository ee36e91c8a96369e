"""What a reconstruction looks like: its views as (H, W, 3) uint8 arrays, the grid and the error heatmap, and PNG.

Views: original (the model's input), masked (masked patches blanked), reconstruction (every patch predicted), paste
(visible original + predicted masked patches), error (per-patch RMSE heatmap), grid (the official demo's four
panels side by side).
"""

from __future__ import annotations

import struct
import zlib
from typing import Literal, get_args

import numpy as np

from app.serving.pipeline import ReconstructAnswer

View = Literal["paste", "reconstruction", "masked", "original", "grid", "error"]
VIEWS: tuple[View, ...] = get_args(View)
PANELS: tuple[View, ...] = ("original", "masked", "reconstruction", "paste")


def view(r: ReconstructAnswer, name: View) -> np.ndarray:
    """One view; only what it needs is drawn (a PNG answer has one view). uint8 throughout: the model's pixels came
    quantised (model.outputs.to_uint8) and the input is the preprocessed uint8 image, so every view is exact."""
    if name == "original":
        return r.image
    if name == "error":
        return error_heatmap(r.out.patch_error, r.out.grid, r.patch_size)
    if name == "grid":
        return grid_view([view(r, k) for k in PANELS])
    p, (gh, gw) = r.patch_size, r.out.grid
    pixels = r.out.pixels
    if name == "reconstruction":
        return unpatchify(pixels, p, gh, gw)
    masked = r.out.mask
    patches = patchify(r.image, p)
    if name == "paste":
        patches[masked] = pixels[masked]
    elif name == "masked":
        patches[masked] = 0
    else:
        raise ValueError(f"unknown view {name!r}")
    return unpatchify(patches, p, gh, gw)


def all_views(r: ReconstructAnswer) -> dict[View, np.ndarray]:
    views: dict[View, np.ndarray] = {k: view(r, k) for k in PANELS}
    views["error"] = view(r, "error")
    views["grid"] = grid_view([views[k] for k in PANELS])
    return views


def png(r: ReconstructAnswer, name: View) -> bytes:
    """One view as PNG (a PNG answer)."""
    return encode_png(view(r, name))


def pngs(r: ReconstructAnswer) -> dict[View, bytes]:
    """Every view as PNG (a JSON answer)."""
    return {k: encode_png(v) for k, v in all_views(r).items()}


def patchify(image: np.ndarray, p: int) -> np.ndarray:
    """(H, W, C) -> (L, p*p*C), a copy, in the model's patch order (rows of patches, each row by row, channels last)."""
    h, w, c = image.shape
    return image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * c)


def unpatchify(patches: np.ndarray, p: int, gh: int, gw: int) -> np.ndarray:
    """(L, p*p*C) -> (H, W, C), contiguous."""
    c = patches.shape[-1] // (p * p)
    return np.ascontiguousarray(patches.reshape(gh, gw, p, p, c).transpose(0, 2, 1, 3, 4).reshape(gh * p, gw * p, c))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> an 8-bit RGB PNG.

    Written here rather than by Pillow: every row uses PNG's "Sub" filter (each byte minus the one a pixel to its
    left, computed by numpy for the whole image at once) and zlib level 1 with the RLE strategy: about twice as
    fast as Pillow's fastest setting for files a few percent larger (BENCHMARKS.md). Any PNG decoder reads it.
    """
    a = np.ascontiguousarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {a.shape}")
    h, w, _ = a.shape
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(raw.data) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# A perceptually ordered ramp (dark -> bright) for the error heatmap; 0 = perfect, 1 = worst.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]], dtype=np.float32)  # fmt: skip


def error_heatmap(patch_error: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Per-patch MSE -> (H, W, 3) uint8 heatmap. Colour = RMSE in [0, 1] pixel units over 0..0.5 (fixed, so
    heatmaps compare across images); visible patches are shown at 0."""
    rmse = np.sqrt(np.clip(patch_error.astype(np.float32), 0, None)).reshape(grid)
    t = np.clip(rmse / 0.5, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[hi] * frac
    rgb = rgb.astype(np.uint8).repeat(patch_size, axis=0).repeat(patch_size, axis=1)
    return rgb


def grid_view(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Panels side by side on white: original | masked | reconstruction | paste (the official demo's four)."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out
