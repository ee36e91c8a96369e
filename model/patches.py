"""The patch layout, written once: images (N, C, H, W) <-> patches (N, L, p*p*C), patches in raster order (rows of
patches), each patch flattened row by row with channels last: the official `patchify` order. The model, its outputs'
image views and the loss use these; app/serving/render.py draws the same order in numpy."""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C)."""
    # Channels last first: then each patch row is one contiguous run of p*C values to copy, not p*C strided ones
    # (BENCHMARKS.md). The same values: only data moves.
    nhwc = imgs.permute(0, 2, 3, 1).contiguous()
    return rearrange(nhwc, "n (h p) (w q) c -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W). A square grid is assumed when none is given."""
    if grid is None:
        side = int(round(x.shape[1] ** 0.5))
        grid = (side, side)
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p)
