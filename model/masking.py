"""Which patches the encoder sees.

A masking is described, as in the official code, by per-image `noise` (N, L): patches are sorted by noise and
the first `len_keep` are kept. Every random draw comes from a caller's seed or `torch.Generator`, never from
the global RNG, so the same seed gives the same mask on any machine. Explicit masks become noise that sorts
visible patches first, in raster order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The mask ratio when none is asked for: the paper's 75 % for a reconstruction; an embedding sees every patch.
RECONSTRUCT_MASK_RATIO = 0.75
EMBED_MASK_RATIO = 0.0


@dataclass(frozen=True)
class Masking:
    """Per-image noise (N, L) and the number of patches kept. Images batch together iff len_keep agrees: a batch's
    masking is `Masking(torch.cat(noises), len_keep)`. The functions below make valid ones; the model checks the
    noise against its tokens and len_keep against 1..L where it applies them."""

    noise: torch.Tensor
    len_keep: int

    @property
    def num_patches(self) -> int:
        return self.noise.shape[1]

    def mask(self) -> torch.Tensor:
        """(N, L) binary mask, 1 = removed (masked), 0 = kept, in raster order."""
        ids_shuffle = torch.argsort(self.noise, dim=1)
        mask = torch.ones_like(self.noise)
        mask[:, : self.len_keep] = 0
        return torch.gather(mask, 1, torch.argsort(ids_shuffle, dim=1))

    def masked_indices(self) -> list[list[int]]:
        """Per image, the sorted raster indices of the masked patches."""
        return [torch.nonzero(row, as_tuple=True)[0].tolist() for row in self.mask()]


def len_keep_for_ratio(num_patches: int, mask_ratio: float) -> int:
    """The official convention: len_keep = int(L * (1 - mask_ratio)). 0 <= ratio < 1; at least one patch stays."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_noise(
    batch: int, num_patches: int, *, seed: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform noise (batch, num_patches) on the CPU from a seed or a generator (exactly one)."""
    if (seed is None) == (generator is None):
        raise ValueError("give exactly one of seed or generator")
    if generator is None:
        assert seed is not None
        generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_patches, generator=generator)


def random_masking_spec(num_patches: int, mask_ratio: float, seed: int, batch: int = 1) -> Masking:
    """The random masking that `seed` and `mask_ratio` name."""
    return Masking(random_noise(batch, num_patches, seed=seed), len_keep_for_ratio(num_patches, mask_ratio))


def no_masking(num_patches: int, batch: int = 1) -> Masking:
    """Every patch kept, in raster order (mask ratio 0, ordered noise)."""
    noise = torch.arange(num_patches, dtype=torch.float32).expand(batch, num_patches).clone()
    return Masking(noise, num_patches)


def explicit_masking(masked: Sequence[int], num_patches: int) -> Masking:
    """One image whose masked patches are exactly `masked` (raster indices). Visible patches stay in raster order."""
    idx = sorted(set(int(i) for i in masked))
    if len(idx) != len(masked):
        raise ValueError("explicit mask lists a patch more than once")
    if idx and (idx[0] < 0 or idx[-1] >= num_patches):
        raise ValueError(f"explicit mask indices must be in 0..{num_patches - 1}")
    if len(idx) >= num_patches:
        raise ValueError("explicit mask hides every patch; at least one must stay visible")
    noise = torch.arange(num_patches, dtype=torch.float32)
    noise[idx] += num_patches  # masked patches sort after every visible one
    return Masking(noise[None], num_patches - len(idx))
