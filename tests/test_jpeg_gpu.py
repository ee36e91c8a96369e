"""MAE_JPEG_DECODE: cpu (Pillow) stays the default; cuda is refused at start where it cannot work; the GPU path's
resize matches Pillow's within a bound, run here on the CPU (nvJPEG itself runs in scripts/gpu/kit.py on a GPU)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from app.serving import imaging, jpeg_gpu
from app.serving.errors import UnreadableImage
from app.serving.registry import ModelLoadError
from app.serving.service import check_jpeg_decode
from app.settings import Settings

pytestmark = pytest.mark.unit


def photo(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    scene = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    pixels = np.asarray(scene, np.int16) + rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, fmt, quality=90)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_cpu_is_the_default_and_only_cpu_or_cuda_are_taken(monkeypatch):
    monkeypatch.delenv("MAE_JPEG_DECODE", raising=False)
    assert Settings().jpeg_decode == "cpu"
    monkeypatch.setenv("MAE_JPEG_DECODE", "cuda")
    assert Settings().jpeg_decode == "cuda"
    for bad in ("gpu", "nvjpeg", ""):
        with pytest.raises(ValidationError):
            Settings(jpeg_decode=bad)


def test_cuda_decode_where_it_cannot_work_stops_the_start(monkeypatch):
    check_jpeg_decode(Settings(jpeg_decode="cpu", device="cuda"))  # the default asks nothing of the machine
    with pytest.raises(ModelLoadError, match="needs the model on a GPU"):
        check_jpeg_decode(Settings(jpeg_decode="cuda", device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        check_jpeg_decode(Settings(jpeg_decode="cuda", device="auto"))
    assert jpeg_gpu.decode_device("cuda:1") == torch.device("cuda:1")
    assert jpeg_gpu.decode_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("mode", ["squash", "crop", "pad"])
@pytest.mark.parametrize("size", [(1200, 900), (641, 1003), (213, 320), (333, 500)])
def test_the_gpu_paths_resize_is_pillows_within_a_bound(mode, size):
    """The torch resize (what runs on the GPU) against imaging.preprocess, on the same decoded pixels."""
    rgb = imaging.decode(photo(*size), 10**9)
    ref = imaging.preprocess(rgb, 224, mode)
    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    got = jpeg_gpu.preprocess(pixels, 224, mode).numpy()
    assert got.shape == ref.shape == (224, 224, 3) and got.dtype == np.uint8
    assert psnr(ref, got) >= 50.0 and np.abs(ref.astype(int) - got).max() <= 3, psnr(ref, got)


def test_decode_preprocess_on_the_cpu_device():
    """With torchvision here (torch 2.11 and its torchvision, as on the device): its JPEG decoder on the CPU, and
    what does not go that way (PNG, a corrupt JPEG) answers exactly as the CPU path."""
    pytest.importorskip("torchvision")
    cpu = torch.device("cpu")
    for size in ((1024, 768), (333, 500)):
        data = photo(*size)
        ref = imaging.preprocess(imaging.decode(data, 10**9), 224, "squash")
        got = jpeg_gpu.decode_preprocess(data, 224, "squash", cpu, 10**9, 32)
        assert psnr(ref, got) >= 45.0
    png = photo(300, 200, fmt="PNG")
    want = imaging.preprocess(imaging.decode(png, 10**9), 224, "crop")
    assert np.array_equal(jpeg_gpu.decode_preprocess(png, 224, "crop", cpu, 10**9, 32), want)
    broken = photo(300, 200)[:600]
    with pytest.raises(UnreadableImage):
        jpeg_gpu.decode_preprocess(broken, 224, "squash", cpu, 10**9, 32)
