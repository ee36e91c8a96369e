"""Training data: an image folder decoded once into memory, augmented as in the paper.

On a 2-core machine a loader thread slows training (it competes with the matmuls), so images are decoded once,
kept as a half-size uint8 copy, and cropped in the main thread: RandomResizedCrop(scale 0.2-1) + flip.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    return files


def load_rgb(path: str | Path, max_side: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8, optionally downscaled so the long side is at most max_side."""
    with Image.open(path) as f:
        im = f.convert("RGB")
        if max_side and max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return (
            torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3).permute(2, 0, 1)
        )


def resize_to(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/float (3, H, W) -> float (3, size, size) in [0, 1] ("squash", antialiased bilinear)."""
    x = img.float()[None] / 255.0 if img.dtype == torch.uint8 else img[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def crop_box(
    h: int,
    w: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering a `scale` fraction of the area, aspect in `ratio`
    (log-uniform), as torchvision's RandomResizedCrop.get_params; after 10 misses, the largest centre crop."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    cw, ch = min(w, round(h * ratio[1])), min(h, round(w / ratio[0]))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ImageFolderInMemory:
    """Decoded photos and a seeded sampler of augmented batches in [0, 1]."""

    def __init__(
        self, folder: str | Path, img_size: int, cache_side: int = 512, scale: tuple[float, float] = (0.2, 1.0)
    ) -> None:
        self.files = list_images(folder)
        self.images = [load_rgb(p, cache_side) for p in self.files]
        self.img_size = img_size
        self.scale = scale

    def __len__(self) -> int:
        return len(self.images)

    def random_resized_crop(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision's RandomResizedCrop(scale=self.scale, ratio=(3/4, 4/3)) with an explicit generator."""
        _, h, w = img.shape
        top, left, ch, cw = crop_box(h, w, g, self.scale)
        return resize_to(img[:, top : top + ch, left : left + cw], self.img_size)

    def batch(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.images), (batch_size,), generator=g).tolist()
        flips = torch.rand(batch_size, generator=g).tolist()
        out = []
        for i, f in zip(idx, flips, strict=True):
            crop = self.random_resized_crop(self.images[i], g)
            out.append(crop.flip(-1) if f < 0.5 else crop)
        return torch.stack(out)
