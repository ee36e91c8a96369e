"""What the serving entry points return: a batch (`EncodeBatch`, `ReconstructBatch`) where the model ran, and per
image, by `unbatch()` (`Embedding`, `Reconstruction`), on the CPU.

`unbatch()` makes one device-to-host copy per tensor for the whole batch, of exactly what an answer needs: float32
embeddings; for a reconstruction the predicted pixels as uint8 in patch layout, the mask and the per-patch error.
Per image, the results are numpy arrays (views of the batch's host copy): what is done with them next (JSON, PNG,
npz) is numpy's business, never a torch op on a tiny tensor.
The image views (paste, masked, ...) are drawn from those and the input by the caller (app/serving/render.py); the batch
keeps them as properties for evaluation and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from model.patches import unpatchify

MSE_FLOOR = 1e-10
PSNR_CAP_DB = 10.0 * math.log10(1.0 / MSE_FLOOR)  # 100 dB


def psnr(mse: float) -> float:
    """PSNR in dB for pixels in [0, 1], capped at PSNR_CAP_DB (an MSE of 0 gives 100 dB: JSON has no inf)."""
    return 10.0 * math.log10(1.0 / max(float(mse), MSE_FLOOR))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> uint8, rounded to nearest (x * 255 + 0.5, truncated): the one quantisation of the service."""
    return (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)


@dataclass(frozen=True)
class Embedding:
    """One image's encoder tokens after the final norm, float32 on the CPU. `patches` in raster order;
    `patch_indices` says which."""

    cls: np.ndarray | None  # (D,) float32; None for a model without a CLS token
    mean: np.ndarray  # (D,) float32, the mean of the patch tokens
    patches: np.ndarray  # (K, D) float32
    patch_indices: np.ndarray  # (K,) int64 raster indices, ascending
    grid: tuple[int, int]


@dataclass(frozen=True)
class EncodeBatch:
    """A batch of encoder outputs, where the model ran."""

    cls: torch.Tensor | None  # (N, D)
    patches: torch.Tensor  # (N, K, D)
    patch_indices: torch.Tensor  # (N, K)
    grid: tuple[int, int]

    @property
    def mean(self) -> torch.Tensor:
        return self.patches.mean(dim=1)

    def unbatch(self) -> list[Embedding]:
        """One Embedding per image, float32 on the CPU (one copy per tensor for the batch)."""
        cls = None if self.cls is None else self.cls.float().cpu().numpy()
        mean, patches = self.mean.float().cpu().numpy(), self.patches.float().cpu().numpy()
        indices = self.patch_indices.cpu().numpy()
        return [
            Embedding(None if cls is None else cls[i], mean[i], patches[i], indices[i], self.grid)
            for i in range(patches.shape[0])
        ]


@dataclass(frozen=True)
class Reconstruction:
    """One image's reconstruction on the CPU, as compact as a viewer allows (app/serving/render.py draws the views)."""

    pixels: np.ndarray  # (L, p*p*C) uint8: the predicted pixels of every patch, in the model's patch order
    mask: np.ndarray  # (L,) bool, True = masked
    patch_error: np.ndarray  # (L,) float32 per-patch MSE in [0, 1] pixel space; 0 on visible patches
    mse: float  # mean over masked patches (0 when nothing is masked)
    grid: tuple[int, int]
    patch_size: int
    # PSNR over the masked patches (`psnr`); None when no patch is masked: there is nothing to measure.
    psnr: float | None = field(init=False)

    def __post_init__(self) -> None:  # worked out with the answer, so readers take a field
        object.__setattr__(self, "psnr", psnr(self.mse) if bool(self.mask.any()) else None)


@dataclass(frozen=True)
class ReconstructBatch:
    """Everything one reconstruction of a batch yields, where the model ran.

    `pred` is the decoder's raw output (N, L, p*p*C) in the model's target space: normalised pixels, or, for a
    `norm_pix_loss` model, per-patch standardised pixels. `pixels` is that prediction in [0, 1] pixel space, clipped,
    in patch layout: for a `norm_pix_loss` model it re-uses each patch's true mean and variance (as the official
    visualisations do), so masked patches borrow their real brightness and contrast and only the structure inside
    them is predicted.
    """

    pred: torch.Tensor
    mask: torch.Tensor  # (N, L), 1 = masked
    pixels: torch.Tensor  # (N, L, p*p*C) in [0, 1]
    images: torch.Tensor  # (N, C, H, W) the input in [0, 1]
    patch_error: torch.Tensor  # (N, L) per-patch MSE in [0, 1] pixel space; 0 on visible patches
    mse: torch.Tensor  # (N,) mean over masked patches (0 when nothing is masked)
    grid: tuple[int, int]

    @property
    def patch_size(self) -> int:
        return self.images.shape[-1] // self.grid[1]

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid)

    @property
    def reconstruction(self) -> torch.Tensor:
        """(N, C, H, W) every patch predicted."""
        return self._image(self.pixels)

    @property
    def mask_image(self) -> torch.Tensor:
        """(N, 1, H, W) 1 on masked patches."""
        return self._image(self.mask[..., None].float().expand(-1, -1, self.patch_size**2))

    @property
    def paste(self) -> torch.Tensor:
        """(N, C, H, W) the visible input + the predicted masked patches."""
        m = self.mask_image
        return self.images.float() * (1 - m) + self.reconstruction * m

    @property
    def masked(self) -> torch.Tensor:
        """(N, C, H, W) the input with masked patches blanked (0)."""
        return self.images.float() * (1 - self.mask_image)

    def unbatch(self) -> list[Reconstruction]:
        """One Reconstruction per image on the CPU: the pixels quantised to uint8 where the model ran, then one copy
        per tensor for the batch."""
        pixels, mask = to_uint8(self.pixels).cpu().numpy(), self.mask.bool().cpu().numpy()
        err, mse = self.patch_error.float().cpu().numpy(), self.mse.float().tolist()
        p = self.patch_size
        return [Reconstruction(pixels[i], mask[i], err[i], float(mse[i]), self.grid, p) for i in range(pixels.shape[0])]
