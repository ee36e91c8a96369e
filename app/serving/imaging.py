"""Bytes -> the model's input. Decode with limits first, then preprocess like the official demo.

Policy for unusual images (documented in the README):
- formats: PNG, JPEG, WebP, single frame only (animated PNG/WebP refused; of a multi-picture JPEG only the first
  picture is read), sniffed from the bytes, not the declared type;
- width x height is checked against the pixel cap from the header, before any pixel is decoded;
- greyscale, palette, CMYK and 16-bit images are converted to 8-bit RGB; alpha is composited onto white.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.serving.errors import ImageTooLarge, UnreadableImage, UnsupportedImage
from client.vocabulary import ResizeMode, sniff_format

# Pillow's own bomb guard would raise mid-decode with a warning first; we check the header ourselves and turn the
# guard into a hard error beyond our cap as a second line of defence.
Image.MAX_IMAGE_PIXELS = None


def decode(data: bytes, max_pixels: int, min_side: int | None = None, max_jpeg_scans: int = 32) -> Image.Image:
    """Bytes -> an RGB PIL image, or an ImageError: UnreadableImage, ImageTooLarge (pixels or scans), UnsupportedImage.

    The work is bounded before any pixel is decoded: width x height from the header against `max_pixels`, and for a
    JPEG the number of scans against `max_jpeg_scans` (a progressive decoder walks every block of the image once per
    scan, so a few bytes per scan can cost hours; decode cost <= scans x pixels).

    min_side (MAE_JPEG_DRAFT, off by default): the caller only needs an image whose sides are both at least this long.
    A JPEG is then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= min_side (libjpeg's
    scaled decoding, Pillow's `draft`): faster, but the pixels are not a full decode's, so the model's input is not
    the reference preprocessing's (BENCHMARKS.md measures by how much). Without it, every image is decoded whole.
    """
    im, fmt = open_checked(data, max_pixels, max_jpeg_scans)
    if min_side and fmt == "JPEG":
        im.draft(None, (min_side, min_side))
    try:
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImage("undecodable", f"the {fmt} data is truncated or corrupt: {e}") from None


def open_checked(data: bytes, max_pixels: int, max_jpeg_scans: int) -> tuple[Image.Image, str]:
    """The image opened (its header read, no pixel decoded) and its format, once every limit is checked: what any
    decoder may then decode (decode here, or app.serving.jpeg_gpu)."""
    if not data:
        raise UnreadableImage("empty_image", "the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage("unsupported_type", "unsupported image type: send PNG, JPEG or WebP")
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError:  # its message names the in-memory file object: say the same thing, stably
        raise UnreadableImage("undecodable", f"cannot read the {fmt} header: not a valid {fmt} file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage("undecodable", f"cannot read the {fmt} header: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise UnreadableImage("undecodable", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge("too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if fmt == "JPEG" and (scans := jpeg_scan_count(data, stop_after=max_jpeg_scans)) > max_jpeg_scans:
        raise ImageTooLarge(
            "too_many_scans", f"the JPEG has more than {max_jpeg_scans} scans (found {scans}); re-encode it"
        )
    # A JPEG with several pictures (MPO: the gain map of an "Ultra HDR" phone photo, a stereo pair) is no animation:
    # its first picture is the photo, and only that one is ever decoded.
    if getattr(im, "n_frames", 1) > 1 and fmt != "JPEG":
        raise UnsupportedImage("animated", "animated images are not supported: send a single frame")
    return im, fmt


# In entropy-coded data 0xFF is followed by 0x00 (stuffing) or RSTn; anything else (but fill 0xFF) is a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scan_count(data: bytes, stop_after: int) -> int:
    """The start-of-scan markers of a JPEG's first picture, counted from its segment lengths without decoding.

    Stops counting once past `stop_after`. A corrupt stream ends the count early; the decoder then says what is wrong.
    """
    n, i, end = 0, 2, len(data)
    while i + 4 <= end and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xFF:  # fill byte before a marker
            i += 1
        elif m == 0xD9:  # end of the first picture: an MPO's others are never decoded
            break
        elif 0xD0 <= m <= 0xD7 or m == 0x01:  # markers without a length
            i += 2
        else:
            segment_end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
            if m != 0xDA:
                i = segment_end
                continue
            n += 1
            if n > stop_after:
                break
            hit = _JPEG_MARKER.search(data, segment_end)  # skip the scan's entropy-coded data
            if hit is None:
                break
            i = hit.start()
    return n


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit RGB. Memory: the decoded image plus the RGB result, nothing else full-size."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (the only source of these modes among PNG/JPEG/WebP): Pillow's convert("RGB") would
        # clip at 255; scale 0..65535 to 0..255 instead, whatever the values (a dark image stays dark).
        return _by_strips(im, _grey16_to_rgb)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        return _by_strips(im, _on_white)
    return im.convert("RGB")


def _grey16_to_rgb(strip: Image.Image) -> np.ndarray:
    a = np.asarray(strip)
    if a.dtype.kind != "u":  # mode I: int32
        a = a.clip(0, 65535)
    return np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2)


def _on_white(strip: Image.Image) -> np.ndarray:
    """Composite onto opaque white: the integer arithmetic of Pillow's alpha_composite, equal to it bit for bit."""
    a = np.asarray(strip if strip.mode == "RGBA" else strip.convert("RGBA"))
    rgb, alpha = a[..., :3].astype(np.uint32), a[..., 3:].astype(np.uint32)
    t = rgb * (alpha * 128) + 255 * 128 * (255 - alpha) + (0x80 << 7)  # 7 bits of extra precision, as Pillow
    return ((((t >> 8) + t) >> 8) >> 7).astype(np.uint8)


def _by_strips(im: Image.Image, convert: Callable[[Image.Image], np.ndarray]) -> Image.Image:
    """Convert `im` to RGB a band of rows at a time (~1 Mpx each), so the numpy temporaries stay small."""
    w, h = im.size
    out = Image.new("RGB", (w, h))
    rows = max(1, (1 << 20) // w)
    for y in range(0, h, rows):
        out.paste(Image.fromarray(convert(im.crop((0, y, w, min(h, y + rows)))), "RGB"), (0, y))
    return out


def preprocess(im: Image.Image, size: int, mode: ResizeMode = "squash") -> np.ndarray:
    """RGB image -> (size, size, 3) uint8: the model's input before it becomes float (model_thread.to_input).
    One bicubic resample, whatever the mode:

    squash: the whole image to size x size, ignoring the aspect ratio (what the official demo does);
    crop:   the centre square (side = the short side) to size x size;
    pad:    the whole image with its long side to `size`, centred on a black square.

    Memory is O(model input) whatever the aspect ratio: the crop is a box in source coordinates, never an
    intermediate image scaled up along its long side.
    """
    w, h = im.size
    if mode == "squash":
        out = im.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    elif mode == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        r = im.resize((nw, nh), Image.Resampling.BICUBIC)
        out = Image.new("RGB", (size, size))
        out.paste(r, ((size - nw) // 2, (size - nh) // 2))
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    # numpy, not torch: a torch op would start an OpenMP team in this I/O thread (see app.serving.model_thread)
    return np.asarray(out, dtype=np.uint8)


def load(
    data: bytes, size: int, mode: ResizeMode, max_pixels: int, min_side: int | None = None, max_jpeg_scans: int = 32
) -> np.ndarray:
    """Encoded bytes -> the model's uint8 input (size, size, 3): `decode`, then `preprocess`."""
    return preprocess(decode(data, max_pixels, min_side=min_side, max_jpeg_scans=max_jpeg_scans), size, mode)
