"""MAE_JPEG_DECODE=cuda: a JPEG decoded (nvJPEG, through torchvision) and resized on the GPU; only the model-sized
input comes back to the host. Off by default: the pixels are close to Pillow's but not equal (scripts/gpu/kit.py
measures by how much on a lent GPU).

The limits are the CPU path's, checked from the header before anything is decoded (imaging.open_checked). What
nvJPEG does not take (CMYK, a decode error) goes the CPU way, so a broken image answers exactly as it does there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from app.serving import imaging
from client.vocabulary import ResizeMode

_local = threading.local()


def decode_device(spec: str) -> torch.device:
    """The GPU to decode on: MAE_DEVICE's when it names one, else the first."""
    return torch.device(spec if spec.startswith("cuda") else "cuda")


def unavailable(spec: str) -> str | None:
    """Why MAE_JPEG_DECODE=cuda cannot work here (one line), or None."""
    if spec == "cpu":
        return "MAE_JPEG_DECODE=cuda needs the model on a GPU, not MAE_DEVICE=cpu"
    if not torch.cuda.is_available():
        return "MAE_JPEG_DECODE=cuda but no CUDA device is available"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built for another torch
        return f"MAE_JPEG_DECODE=cuda needs torchvision (torchvision.io.decode_jpeg): {type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def _stream(device: torch.device) -> Iterator[None]:
    """A stream per I/O thread: a decode does not wait behind the model's batch on the default stream."""
    if device.type != "cuda":
        yield
        return
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # Antialiased bicubic (a = -0.5): PyTorch's port of Pillow's resampling filter.
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def preprocess(pixels: torch.Tensor, size: int, mode: ResizeMode) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8 on the same device, with imaging.preprocess's geometry (the crop
    rounded to whole pixels)."""
    _, h, w = pixels.shape
    x = pixels[None].float()
    if mode == "squash":
        out = _resize(x, size, size)
    elif mode == "crop":
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        out = _resize(x[..., top : top + side, left : left + side], size, size)
    elif mode == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        out = x.new_zeros(1, 3, size, size)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[..., top : top + nh, left : left + nw] = _resize(x, nh, nw)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return out.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def decode_preprocess(
    data: bytes, size: int, mode: ResizeMode, device: torch.device, max_pixels: int, max_jpeg_scans: int
) -> np.ndarray:
    """Bytes -> the model's (size, size, 3) uint8 input, a JPEG decoded and resized on `device`, anything else (or a
    JPEG nvJPEG refuses) as imaging.decode + imaging.preprocess do it."""
    im, fmt = imaging.open_checked(data, max_pixels, max_jpeg_scans)
    if fmt == "JPEG" and im.mode in ("RGB", "L"):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with _stream(device):
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                pixels = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
                return preprocess(pixels, size, mode).cpu().numpy()
        except RuntimeError:
            pass  # the CPU path below decodes it, or says what is wrong with it
    rgb = imaging.decode(data, max_pixels, max_jpeg_scans=max_jpeg_scans)
    return imaging.preprocess(rgb, size, mode)
