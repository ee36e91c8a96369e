"""Fixed 2-D sin-cos position embeddings (MAE paper, after MoCo v3) and their interpolation to other grids.

Computed in float64 like the reference numpy code, then cast, so tables match the official ones bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): [sin(pos * omega), cos(pos * omega)], omega_i = 1 / 10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError("embed_dim must be even")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_hw: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(1 + H*W, D) table in raster order, with an all-zero row for the CLS token first.

    As in the reference, the first half of the channels encodes the column (x) and the second half the row (y).
    """
    gh, gw = grid_hw
    grid_w = torch.arange(gw, dtype=torch.float32)
    grid_h = torch.arange(gh, dtype=torch.float32)
    xs, ys = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each (gh, gw), like np.meshgrid(w, h)
    emb = torch.cat([sincos_1d(embed_dim // 2, xs), sincos_1d(embed_dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 1 + n*n, D) table (CLS first) to grid_hw by bicubic interpolation, as HF ViTMAE does.

    Returns the table unchanged when the grid already matches.
    """
    n_pos = pos_embed.shape[1] - 1
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise ValueError(f"position table of {n_pos} patches is not a square grid")
    if (side, side) == tuple(grid_hw):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)
