"""app.serving.imaging in-process: the JPEG scan count, the memory-bounded conversions to RGB, one-step crop and pad."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.serving import errors, imaging

pytestmark = pytest.mark.unit


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if bands == 1 else a, mode)


# ------------------------------------------------------------------------------------------------ scans
def test_scan_count_of_what_encoders_write():
    assert imaging.jpeg_scan_count(jpeg(noise(64, 48)), 100) == 1  # baseline, interleaved
    assert imaging.jpeg_scan_count(jpeg(noise(64, 48), progressive=True), 100) == 10  # libjpeg's progressive script
    assert imaging.jpeg_scan_count(jpeg(noise(64, 48, "L"), progressive=True), 100) == 6
    mpo = io.BytesIO()
    noise(32, 32).save(mpo, "MPO", save_all=True, append_images=[noise(16, 16, seed=1)], progressive=True)
    assert imaging.jpeg_scan_count(mpo.getvalue(), 100) == 10  # the first picture's only


def test_scan_count_is_not_fooled_by_markers_inside_segments_or_entropy_data():
    base = jpeg(noise(64, 48))
    thumbnail = jpeg(noise(16, 16, seed=2), progressive=True)  # 10 SOS markers inside an APP1 segment
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumb = base[:2] + app1 + base[2:]
    assert Image.open(io.BytesIO(with_thumb)).size == (64, 48)
    assert imaging.jpeg_scan_count(with_thumb, 100) == 1
    # Noise makes entropy data full of 0xFF 0x00 stuffing and RST markers: still one scan.
    assert imaging.jpeg_scan_count(jpeg(noise(256, 256), restart_marker_blocks=1), 100) == 1


def test_scan_count_stops_past_the_limit_and_the_decoder_refuses_from_it():
    prog = jpeg(noise(64, 48), progressive=True)
    assert imaging.jpeg_scan_count(prog, 3) == 4  # counted only until past the limit
    with pytest.raises(errors.ImageError) as e:
        imaging.decode(prog, 10**6, max_jpeg_scans=9)
    assert isinstance(e.value, errors.ImageTooLarge) and e.value.code == "too_many_scans"
    assert imaging.decode(prog, 10**6, max_jpeg_scans=10).size == (64, 48)


def test_scan_count_of_truncated_or_junk_data_ends_without_error():
    prog = jpeg(noise(64, 48), progressive=True)
    for cut in (2, 5, 100, len(prog) // 2, len(prog) - 3):
        assert 0 <= imaging.jpeg_scan_count(prog[:cut], 100) <= 10
    assert imaging.jpeg_scan_count(b"\xff\xd8" + b"\x00" * 50, 100) == 0


# ------------------------------------------------------------------------------------------------ conversions
def composited_by_pillow(im: Image.Image) -> np.ndarray:
    rgba = im.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_on_white_equals_pillows_alpha_composite_bit_for_bit(mode):
    im = noise(3000, 700, mode, seed=3)  # ~350 rows a strip: three strips and a partial one
    got = imaging.to_rgb(im)
    assert got.mode == "RGB" and got.size == im.size
    assert np.array_equal(np.asarray(got), composited_by_pillow(im))


def test_palette_with_transparency_equals_pillow():
    im = noise(300, 200, "L", seed=4).convert("P")
    im.putpalette(list(np.random.default_rng(5).integers(0, 256, 768)))
    for transparency in (7, bytes(np.random.default_rng(6).integers(0, 256, 256).astype(np.uint8))):
        buf = io.BytesIO()
        im.save(buf, "PNG", transparency=transparency)
        p = Image.open(io.BytesIO(buf.getvalue()))
        p.load()
        assert np.array_equal(np.asarray(imaging.to_rgb(p)), composited_by_pillow(p))


def test_16_bit_grey_is_scaled_not_clipped():
    a = np.random.default_rng(7).integers(0, 65536, (300, 2000), dtype=np.uint16)
    im = Image.frombytes("I;16", (2000, 300), a.astype("<u2").tobytes())
    got = np.asarray(imaging.to_rgb(im))
    assert np.array_equal(got, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))


# ------------------------------------------------------------------------------------------------ resize modes
def test_crop_is_the_centre_square_resampled_once_and_pad_letterboxes():
    im = noise(120, 80, seed=8)
    crop = imaging.preprocess(im, 32, "crop")
    want = im.resize((32, 32), Image.Resampling.BICUBIC, box=(20, 0, 100, 80))
    assert np.array_equal(crop, np.asarray(want))
    pad = imaging.preprocess(im, 32, "pad")
    assert pad.shape == (32, 32, 3)
    assert pad[:5].max() == 0 and pad[-5:].max() == 0  # black bands top and bottom
    squash = imaging.preprocess(im, 32, "squash")
    assert np.array_equal(squash, np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC)))


def test_slivers_resize_in_every_mode():
    for size in ((1, 5000), (5000, 1)):
        im = Image.new("RGB", size, (10, 200, 30))
        for mode in ("squash", "crop", "pad"):
            t = imaging.preprocess(im, 32, mode)
            assert t.shape == (32, 32, 3)
            assert abs(int(t[..., 1].max()) - 200) <= 2  # the colour survives


def test_error_messages_are_stable_across_calls():
    """An error row written by a client (mae-client embed-dataset) must not differ run to run: no object addresses."""
    for junk in (b"\xff\xd8\xff" + b"junk" * 10, b"RIFF\x00\x00\x00\x00WEBP" + b"x" * 20):
        messages = set()
        for _ in range(2):
            with pytest.raises(errors.ImageError) as e:
                imaging.decode(junk, 10**6)
            messages.add(str(e.value))
        assert len(messages) == 1 and "0x" not in messages.pop()
