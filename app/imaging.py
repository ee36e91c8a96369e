"""Bytes -> pixels -> bytes. Decode with limits first, preprocess like the official demo, encode PNGs.

Policy for unusual images (documented in the README):
- formats: PNG, JPEG, WebP, single frame only (animated PNG/WebP refused; of a multi-picture JPEG only the first
  picture is read), sniffed from the bytes, not the declared type;
- width x height is checked against the pixel cap from the header, before any pixel is decoded;
- greyscale, palette, CMYK and 16-bit images are converted to 8-bit RGB; alpha is composited onto white.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ResizeMode = Literal["squash", "crop", "pad"]

# Pillow's own bomb guard would raise mid-decode with a warning first; we check the header ourselves and turn the
# guard into a hard error beyond our cap as a second line of defence.
Image.MAX_IMAGE_PIXELS = None

_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
}


class ImageError(ValueError):
    """A client's image we will not process. `status` and `code` go into the error answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def sniff_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Bytes -> an RGB PIL image, or ImageError (400 undecodable, 413 too many pixels, 415 unsupported).

    min_side: the caller only needs an image whose sides are both at least this long (it resizes to the model's
    input next). A JPEG is then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= min_side
    (libjpeg's scaled decoding, Pillow's `draft`): a 1024 x 683 photo for a 224 model decodes at 512 x 342, about
    2x faster to decode and 3x faster to resize, and the bicubic resize that follows sees the same detail.
    """
    if not data:
        raise ImageError(400, "empty_image", "the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(415, "unsupported_type", "unsupported image type: send PNG, JPEG or WebP")
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(400, "undecodable", f"cannot read the {fmt} header: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(400, "undecodable", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(413, "too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    # A JPEG with several pictures (MPO: the gain map of an "Ultra HDR" phone photo, a stereo pair) is no animation:
    # its first picture is the photo, and only that one is ever decoded.
    if getattr(im, "n_frames", 1) > 1 and fmt != "JPEG":
        raise ImageError(415, "animated", "animated images are not supported: send a single frame")
    if min_side and fmt == "JPEG":
        im.draft(None, (min_side, min_side))
    try:
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageError(413, "too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(400, "undecodable", f"the {fmt} data is truncated or corrupt: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (the only source of these modes among PNG/JPEG/WebP): Pillow's convert("RGB") would
        # clip at 255; scale 0..65535 to 0..255 instead, whatever the values (a dark image stays dark).
        a = np.asarray(im)
        if a.dtype.kind != "u":  # mode I: int32
            a = a.clip(0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        # Only a palette with a transparent entry needs the alpha path (it costs two more full-size copies).
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(im: Image.Image, size: int, mode: ResizeMode = "squash") -> torch.Tensor:
    """RGB image -> (3, size, size) float32 in [0, 1].

    squash: resize to size x size, ignoring the aspect ratio (what the official demo does);
    crop:   resize the short side to `size`, then take the centre square;
    pad:    resize the long side to `size`, centre it on a black square.
    """
    w, h = im.size
    if mode == "squash":
        out = im.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        r = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = r.crop((left, top, left + size, top + size))
    elif mode == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        r = im.resize((nw, nh), Image.Resampling.BICUBIC)
        out = Image.new("RGB", (size, size))
        out.paste(r, ((size - nw) // 2, (size - nh) // 2))
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    a = np.asarray(out, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: several times faster than the default 6, for files ~10-20% larger.
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# A perceptually ordered ramp (dark -> bright) for the error heatmap; 0 = perfect, 1 = worst.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]], dtype=np.float32)  # fmt: skip


def error_heatmap(patch_error: torch.Tensor, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Per-patch MSE -> (H, W, 3) uint8 heatmap. Colour = RMSE in [0, 1] pixel units over 0..0.5 (fixed, so
    heatmaps compare across images); visible patches are shown at 0."""
    rmse = patch_error.float().clamp(min=0).sqrt().reshape(grid).numpy()
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


def psnr(mse: float) -> float | None:
    """PSNR in dB for pixels in [0, 1]; None when the error is exactly 0 (nothing masked)."""
    return None if mse <= 0 else 10.0 * math.log10(1.0 / mse)
