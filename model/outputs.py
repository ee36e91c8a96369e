"""What the serving entry points return: a batch (`EncodeOutput`, `ReconstructOutput`), and per image, by `unbatch()`
(`Embedding`, `Reconstruction`). Tensors stay where the model made them until `host()` copies a batch to the CPU,
once per tensor; `unbatch()` then only takes views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MSE_FLOOR = 1e-10
PSNR_CAP_DB = 10.0 * math.log10(1.0 / MSE_FLOOR)  # 100 dB


def psnr(mse: float) -> float:
    """PSNR in dB for pixels in [0, 1], capped at PSNR_CAP_DB (an MSE of 0 gives 100 dB: JSON has no inf)."""
    return 10.0 * math.log10(1.0 / max(float(mse), MSE_FLOOR))


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32) if t.is_floating_point() else t.detach().cpu()


@dataclass(frozen=True)
class Embedding:
    """One image's encoder tokens after the final norm. `patches` in raster order; `patch_indices` says which."""

    cls: torch.Tensor | None  # (D,); None for a model without a CLS token
    mean: torch.Tensor  # (D,) mean of the patch tokens
    patches: torch.Tensor  # (K, D)
    patch_indices: torch.Tensor  # (K,) raster indices, ascending
    grid: tuple[int, int]


@dataclass(frozen=True)
class EncodeOutput:
    """A batch of `Embedding`s."""

    cls: torch.Tensor | None  # (N, D)
    patches: torch.Tensor  # (N, K, D)
    patch_indices: torch.Tensor  # (N, K)
    grid: tuple[int, int]

    @property
    def mean(self) -> torch.Tensor:
        return self.patches.mean(dim=1)

    def host(self) -> EncodeOutput:
        """The batch on the CPU in float32."""
        return EncodeOutput(
            cls=None if self.cls is None else _host(self.cls),
            patches=_host(self.patches),
            patch_indices=_host(self.patch_indices),
            grid=self.grid,
        )

    def unbatch(self) -> list[Embedding]:
        mean = self.mean
        return [
            Embedding(
                cls=None if self.cls is None else self.cls[i],
                mean=mean[i],
                patches=self.patches[i],
                patch_indices=self.patch_indices[i],
                grid=self.grid,
            )
            for i in range(self.patches.shape[0])
        ]


@dataclass(frozen=True)
class Reconstruction:
    """One image's reconstruction; images are (C, H, W) in [0, 1]."""

    mask: torch.Tensor  # (L,), 1 = masked
    reconstruction: torch.Tensor
    paste: torch.Tensor  # visible original + predicted masked patches
    masked: torch.Tensor  # original with masked patches blanked (0)
    patch_error: torch.Tensor  # (L,) per-patch MSE in [0, 1] pixel space; 0 on visible patches
    mse: float  # mean over masked patches (0 when nothing is masked)
    grid: tuple[int, int]

    @property
    def psnr(self) -> float | None:
        """PSNR over the masked patches (`psnr`); None when no patch is masked: there is nothing to measure."""
        return psnr(self.mse) if bool(self.mask.any()) else None


@dataclass(frozen=True)
class ReconstructOutput:
    """Everything one reconstruction of a batch yields; images are (N, C, H, W) in [0, 1], clipped.

    `pred` is the decoder's raw output (N, L, p*p*C) in the model's target space: normalised pixels, or, for a
    `norm_pix_loss` model, per-patch standardised pixels. For such a model `reconstruction` re-uses each patch's
    true mean and variance (as the official visualisations do), so masked patches borrow their real brightness
    and contrast and only the structure inside them is predicted.
    """

    pred: torch.Tensor
    mask: torch.Tensor  # (N, L), 1 = masked
    reconstruction: torch.Tensor
    paste: torch.Tensor
    masked: torch.Tensor
    patch_error: torch.Tensor  # (N, L)
    mse: torch.Tensor  # (N,)
    grid: tuple[int, int]

    def host(self) -> ReconstructOutput:
        """The batch on the CPU in float32."""
        return ReconstructOutput(
            pred=_host(self.pred),
            mask=_host(self.mask),
            reconstruction=_host(self.reconstruction),
            paste=_host(self.paste),
            masked=_host(self.masked),
            patch_error=_host(self.patch_error),
            mse=_host(self.mse),
            grid=self.grid,
        )

    def unbatch(self) -> list[Reconstruction]:
        mse = self.mse.tolist()
        return [
            Reconstruction(
                mask=self.mask[i],
                reconstruction=self.reconstruction[i],
                paste=self.paste[i],
                masked=self.masked[i],
                patch_error=self.patch_error[i],
                mse=float(mse[i]),
                grid=self.grid,
            )
            for i in range(self.mask.shape[0])
        ]
