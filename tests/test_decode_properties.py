"""Properties of the decode path (app.serving.imaging), for any bytes a client can send.

- arbitrary bytes, bytes behind a real magic number, and valid files with bytes flipped or cut off never raise
  anything but an ImageError (which app.http.errors answers 400 / 413 / 415), and never decode past the pixel cap;
- any valid small image, in every accepted format and mode, decodes to RGB of its own size and preprocesses to
  (3, S, S) in [0, 1] for every resize mode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.serving import errors, imaging

pytestmark = pytest.mark.unit

FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"RIFF\x00\x01\x00\x00WEBPVP8 "]
CAP = 64 * 64


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (16, 16), (80 * i, 0, 0)) for i in range(3)]
    return [
        _save(rgb, "PNG"),
        _save(rgb, "JPEG"),
        _save(rgb, "JPEG", progressive=True),
        _save(rgb, "WEBP"),
        _save(rgb, "WEBP", lossless=True),
        _save(rgb.convert("P"), "PNG"),
        _save(rgb.convert("LA"), "PNG"),
        _save(rgb.convert("CMYK"), "JPEG"),
        _save(Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80), "PNG"),
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    ]


SEEDS = _seed_files()


def decode_or_image_error(data: bytes) -> Image.Image | None:
    """decode(); None for an ImageError. Any other exception fails the property."""
    try:
        im = imaging.decode(data, CAP)
    except errors.ImageError as e:
        assert type(e) in (errors.UnreadableImage, errors.ImageTooLarge, errors.UnsupportedImage)
        assert e.code and str(e)
        return None
    assert im.mode == "RGB" and im.size[0] * im.size[1] <= CAP
    return im


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_image_error(data):
    decode_or_image_error(data)


@FAST
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_bytes_behind_a_magic_number_only_raise_image_error(magic, rest):
    decode_or_image_error(magic + rest)


@FAST
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 10**6),
)
def test_mutated_and_truncated_files_only_raise_image_error(which, flips, cut):
    data = bytearray(SEEDS[which])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    decode_or_image_error(bytes(data))
    decode_or_image_error(bytes(data[: cut % (len(data) + 1)]))


MODES = ["RGB", "L", "LA", "RGBA", "P", "PA", "1", "I;16", "CMYK"]
FORMATS = {"PNG": {"RGB", "L", "LA", "RGBA", "P", "1", "I;16"}, "JPEG": {"RGB", "L", "CMYK"}, "WEBP": {"RGB", "RGBA"}}


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    st.integers(1, 48),
    st.integers(1, 48),
    st.sampled_from([(f, m) for f, modes in FORMATS.items() for m in sorted(modes)]),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["squash", "crop", "pad"]),
)
def test_valid_small_images_round_trip_to_their_size(w, h, fmt_mode, seed, resize):
    fmt, mode = fmt_mode
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    data = _save(im, fmt)
    out = imaging.decode(data, w * h)  # exactly at the cap: allowed
    assert out.mode == "RGB" and out.size == (w, h)
    if fmt == "PNG" and mode == "RGB":  # lossless: the very pixels
        assert np.array_equal(np.asarray(out), np.asarray(im))
    x = imaging.preprocess(out, 16, resize)
    assert x.shape == (16, 16, 3) and x.dtype == np.uint8
    if w * h > 1:
        with pytest.raises(errors.ImageError) as e:
            imaging.decode(data, w * h - 1)  # one pixel over the cap: refused from the header
        assert isinstance(e.value, errors.ImageTooLarge) and e.value.code == "too_many_pixels"
