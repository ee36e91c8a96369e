"""MAE_JPEG_DECODE=cuda: a JPEG decoded (nvJPEG, through torchvision) and resized on the GPU; only the model-sized
input comes back to the host. Off by default: the pixels are close to Pillow's but not equal (scripts/gpu/kit.py
measures by how much on a lent GPU).

The limits are the CPU path's, checked from the header before anything is decoded (imaging.open_checked). What
nvJPEG does not take (CMYK, a decode error) goes the CPU way, so a broken image answers exactly as it does there.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np
import torch

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


@functools.lru_cache(maxsize=64)  # photos come in a few sizes; each matrix is at most a few MB on the device
def _weights(in_size: int, box0: float, box1: float, out_size: int, device: torch.device) -> torch.Tensor:
    """(out_size, in_size) resampling weights of Pillow's bicubic filter (a = -0.5, widened when shrinking) for the
    input span [box0, box1): Pillow's precompute_coeffs, as a dense matrix."""
    scale = (box1 - box0) / out_size
    fscale = max(scale, 1.0)
    centers = box0 + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(centers - 2.0 * fscale + 0.5), 0)
    xmax = np.minimum(np.trunc(centers + 2.0 * fscale + 0.5), in_size)
    x = np.arange(in_size)
    t = np.abs((x[None, :] - centers[:, None] + 0.5) / fscale)
    w = np.where(t < 1, (1.5 * t - 2.5) * t * t + 1, np.where(t < 2, -0.5 * (((t - 5) * t + 8) * t - 4), 0.0))
    w = np.where((x[None, :] >= xmin[:, None]) & (x[None, :] < xmax[:, None]), w, 0.0)
    return torch.from_numpy((w / w.sum(axis=1, keepdims=True)).astype(np.float32)).to(device)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor_().clamp_(0, 255)  # Pillow rounds half up and clips after each pass


def _resize(x: torch.Tensor, box: tuple[float, float, float, float], w: int, h: int) -> torch.Tensor:
    """(3, H, W) pixels as floats -> (3, h, w): Pillow's Image.resize(BICUBIC, box=box), the horizontal pass then the
    vertical, each rounded to 8 bits as Pillow does (a pass it would skip is skipped). Pillow 13 runs the vertical
    pass first for some tall images: there a few pixels differ by up to 3 levels."""
    _, H, W = x.shape
    if (w, box[0], box[2]) != (W, 0, W):
        x = _to_u8(x @ _weights(W, box[0], box[2], w, x.device).T)
    if (h, box[1], box[3]) != (H, 0, H):
        x = _to_u8(_weights(H, box[1], box[3], h, x.device) @ x)
    return x


def preprocess(pixels: torch.Tensor, size: int, mode: ResizeMode) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8 on the same device: imaging.preprocess, step for step."""
    _, h, w = pixels.shape
    x = pixels.float()
    if mode == "squash":
        out = _resize(x, (0, 0, w, h), size, size)
    elif mode == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        out = _resize(x, (left, top, left + side, top + side), size, size)
    elif mode == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        out = x.new_zeros(3, size, size)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[:, top : top + nh, left : left + nw] = _resize(x, (0, 0, w, h), nw, nh)
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return out.to(torch.uint8).permute(1, 2, 0)


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
    return imaging.load(data, size, mode, max_pixels, max_jpeg_scans=max_jpeg_scans)
