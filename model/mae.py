"""The MAE: a ViT encoder over visible patches, a light decoder that predicts every patch's pixels.

Mirrors facebookresearch/mae `models_mae.py` step by step (and its parameter names, so the official
checkpoints load as they are): patchify -> random_masking -> forward_encoder -> forward_decoder ->
forward_loss. `encode` and `reconstruct` are the serving entry points; they take images in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model.config import MAEConfig
from model.family import PatchModel
from model.masking import Masking, no_masking
from model.outputs import EncodeBatch
from model.pos_embed import interpolate_pos_embed, sincos_2d


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT block, as the official MAE uses)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "n d h w -> n (h w) d")


class MAE(PatchModel[MAEConfig]):
    """Masked Autoencoder with a ViT backbone."""

    family = "mae"  # the architecture family, as /v1/models reports it
    pos_embed: torch.Tensor
    decoder_pos_embed: torch.Tensor
    no_decoder_message = "this checkpoint has no pixel decoder (encoder-only weights): it can embed but not reconstruct"

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        c = self.config = config
        # --- encoder ---
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        # Fixed sin-cos tables; kept in the state dict like the official checkpoints, never trained.
        self.register_buffer("pos_embed", sincos_2d(c.embed_dim, c.grid_size)[None])
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.layer_norm_eps) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        # --- decoder (absent in encoder-only checkpoints) ---
        if c.has_decoder:
            self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
            self.register_buffer("decoder_pos_embed", sincos_2d(c.decoder_embed_dim, c.grid_size)[None])
            self.decoder_blocks = nn.ModuleList(
                Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, c.layer_norm_eps)
                for _ in range(c.decoder_depth)
            )
            self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=c.layer_norm_eps)
            self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_dim)
        self.register_pixel_stats(c.pixel_mean, c.pixel_std)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier for linears and the patch projection, N(0, .02) for tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.config.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def transformer_stacks(self) -> list[nn.Module]:
        blocks: list[nn.Module] = list(self.blocks)
        return blocks + (list(self.decoder_blocks) if self.config.has_decoder else [])

    # ------------------------------------------------------------------ shapes
    def grid_for(self, imgs: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        h, w = imgs.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return (h // p, w // p)

    # ------------------------------------------------------------------ the paper's steps
    @staticmethod
    def random_masking(x: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the `len_keep` patches with the smallest noise (official per-sample shuffling).

        Returns the kept tokens (N, len_keep, D), the mask (N, L; 1 = removed) and ids_restore (N, L).
        """
        n, length, dim = x.shape
        if masking.noise.shape != (n, length):
            raise ValueError(f"noise {tuple(masking.noise.shape)} does not match tokens {(n, length)}")
        if not 0 < masking.len_keep <= length:
            raise ValueError(f"len_keep must be in 1..{length}, got {masking.len_keep}")
        noise = masking.noise.to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : masking.len_keep]
        x_masked = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, : masking.len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def _pos_embed_at(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """A position table at `grid`: itself at the trained grid, else interpolated (model.pos_embed)."""
        return table if grid == self.config.grid_size else interpolate_pos_embed(table, grid)

    def forward_encoder(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images -> latent (N, 1 + len_keep, D) after the final norm, mask, ids_restore."""
        grid = self.grid_for(imgs)
        pos = self._pos_embed_at(self.pos_embed, grid)
        x = self.patch_embed(imgs) + pos[:, 1:]
        x, mask, ids_restore = self.random_masking(x, masking)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent of visible patches -> pixel predictions for every patch (N, L, p*p*C), raster order (a model with
        a decoder: `forward` and `reconstruct` check)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self._pos_embed_at(self.decoder_pos_embed, grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to predict: patches, standardised per patch if norm_pix_loss."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches only. 0 (not NaN) when nothing is masked."""
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training step on normalised images: (loss, pred, mask), as the official forward."""
        self.require_decoder()
        latent, mask, ids_restore = self.forward_encoder(imgs, masking)
        pred = self.forward_decoder(latent, ids_restore, self.grid_for(imgs))
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ------------------------------------------------------------------ serving entry points
    def loss(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        return self(imgs, masking)[0]

    def forward_embeddings(self, imgs: torch.Tensor, masking: Masking | None) -> EncodeBatch:
        """Normalised images -> CLS and patch tokens after the final norm, patches in raster order (`encode`)."""
        grid = self.grid_for(imgs)
        if masking is None:
            masking = no_masking(grid[0] * grid[1], imgs.shape[0])
        latent, _, _ = self.forward_encoder(imgs, masking)
        ids_keep = torch.argsort(masking.noise.to(latent.device), dim=1)[:, : masking.len_keep]
        order = torch.argsort(ids_keep, dim=1)  # the encoder's token order -> raster order
        patches = torch.gather(latent[:, 1:], 1, order[..., None].expand(-1, -1, latent.shape[-1]))
        return EncodeBatch(cls=latent[:, 0], patches=patches, patch_indices=torch.gather(ids_keep, 1, order), grid=grid)

    def forward_prediction(
        self, imgs: torch.Tensor, masking: Masking
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Normalised images -> (the decoder's prediction for every patch, the mask, the grid) (`reconstruct`)."""
        grid = self.grid_for(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, masking)
        return self.forward_decoder(latent, ids_restore, grid), mask, grid
