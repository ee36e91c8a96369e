"""Serve MAEs built with lucidrains' vit-pytorch (`vit_pytorch.vit.ViT` wrapped by `vit_pytorch.mae.MAE`).

The module names below mirror vit-pytorch 1.16.0's parameter names, so a `state_dict()` of its `MAE` (or of the
encoder `ViT` alone, for embeddings) loads as it is. Written here, not imported, so serving never needs the
package. What the weights cannot tell (heads, image and patch size, pixel normalisation, ...) comes from a JSON
sidecar next to the weights: `model.pt` -> `model.json` (see `SIDECAR_KEYS` and docs/VIT_PYTORCH.md).

vit-pytorch's training pass, which `forward`/`reconstruct` follow step by step:
    patches = patchify(img)                             # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
    tokens = LN -> Linear -> LN (patches) + pos_embedding[:, n_cls:]   # no CLS token in the MAE pass
    rand_indices = torch.rand(b, L).argsort(-1); masked = first int(ratio * L), unmasked = the rest
    decoded = decoder(scatter(enc_to_dec(encoder.transformer(tokens[unmasked])) + pos, mask_token + pos))
    loss = mse(to_pixels(decoded[masked]), patches[masked])
Masking correspondence: their `rand` r is our `noise = 1 - r`. Sorting 1 - r ascending is sorting r descending,
so our visible set argsort(noise)[:, :len_keep] is exactly their unmasked set rand_indices[:, num_masked:] when
len_keep = L - int(ratio * L) (see `masking_from_rand`). `encode` follows the ViT's own forward instead: CLS
(pool='cls') prepended, as `ViT.forward` and a fine-tuned classifier see it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from model.family import PatchGrid, PatchModel
from model.masking import Masking, no_masking
from model.outputs import EncodeBatch

FAMILY = "vit-pytorch"
LAYER_NORM_EPS = 1e-5  # torch's default, which vit-pytorch uses everywhere


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class VitPytorchConfig(PatchGrid):
    """What one vit-pytorch MAE (or ViT) is: sidecar values plus shapes read off the weights."""

    family: ClassVar[str] = FAMILY
    norm_pix_loss: ClassVar[bool] = False  # vit-pytorch's target is raw (input-space) patches

    name: str
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    dim_head: int
    mlp_dim: int
    pool: str
    has_decoder: bool
    decoder_embed_dim: int | None
    decoder_depth: int | None
    decoder_num_heads: int | None
    decoder_dim_head: int | None
    decoder_mlp_dim: int | None
    # vit-pytorch 1.16.0 sizes decoder_pos_emb by pos_embedding's length (L + 1 with a CLS; the extra row is unused).
    decoder_pos_rows: int | None
    has_enc_to_dec: bool
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    masking_ratio: float | None = None

    @property
    def num_cls_tokens(self) -> int:
        return 1 if self.pool == "cls" else 0

    @property
    def has_cls(self) -> bool:
        return self.pool == "cls"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(family=self.family, norm_pix_loss=self.norm_pix_loss)
        d["pixel_mean"], d["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        return d


# ---------------------------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """vit-pytorch's Attention: pre-norm inside, qkv without bias, `to_out` absent when heads*dim_head == dim."""

    def __init__(self, dim: int, heads: int, dim_head: int, project_out: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        # Index 0 keeps the key `to_out.0.*`; vit-pytorch's Dropout at index 1 has no parameters.
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim)) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale dim_head ** -0.5, as vit-pytorch
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Same indices as vit-pytorch (LN, Linear, GELU, Dropout, Linear, Dropout): keys net.0, net.1, net.4.
        self.net = nn.Sequential(
            nn.LayerNorm(dim, eps=LAYER_NORM_EPS),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Identity(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """Residual pre-norm layers and a final LayerNorm (`transformer.norm`)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        project_out = not (heads == 1 and dim_head == dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, project_out), FeedForward(dim, mlp_dim)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            attn, ff = layer[0], layer[1]  # type: ignore[index]  # each layer: ModuleList([Attention, FeedForward])
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ViTEncoder(nn.Module):
    """vit-pytorch's ViT without its classification head (`mlp_head` is not served and is dropped on load)."""

    def __init__(self, c: VitPytorchConfig) -> None:
        super().__init__()
        p = c.patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p),
            nn.LayerNorm(c.patch_dim, eps=LAYER_NORM_EPS),
            nn.Linear(c.patch_dim, c.embed_dim),
            nn.LayerNorm(c.embed_dim, eps=LAYER_NORM_EPS),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, c.num_cls_tokens, c.embed_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.num_patches + c.num_cls_tokens, c.embed_dim))
        self.transformer = Transformer(c.embed_dim, c.depth, c.num_heads, c.dim_head, c.mlp_dim)


class VitPytorchMAE(PatchModel[VitPytorchConfig]):
    """A vit-pytorch MAE behind model.mae.MAE's serving entry points (encode, reconstruct, loss)."""

    family = FAMILY
    no_decoder_message = (
        "this checkpoint is a vit-pytorch ViT without the MAE decoder: it can embed but not reconstruct"
    )

    def __init__(self, config: VitPytorchConfig) -> None:
        super().__init__()
        c = self.config = config
        self.encoder = ViTEncoder(c)
        if c.has_decoder:
            assert c.decoder_embed_dim and c.decoder_depth and c.decoder_num_heads  # for the type checker
            assert c.decoder_dim_head and c.decoder_mlp_dim
            dd = c.decoder_embed_dim
            self.enc_to_dec = nn.Linear(c.embed_dim, dd) if c.has_enc_to_dec else nn.Identity()
            self.mask_token = nn.Parameter(torch.zeros(dd))
            self.decoder = Transformer(dd, c.decoder_depth, c.decoder_num_heads, c.decoder_dim_head, c.decoder_mlp_dim)
            self.decoder_pos_emb = nn.Embedding(c.decoder_pos_rows or c.num_patches, dd)
            self.to_pixels = nn.Linear(dd, c.patch_dim)
        self.register_pixel_stats(c.pixel_mean, c.pixel_std)

    def transformer_stacks(self) -> list[nn.Module]:
        stacks: list[nn.Module] = [self.encoder.transformer]
        return stacks + ([self.decoder] if self.config.has_decoder else [])

    # ------------------------------------------------------------------ shapes and spaces
    def grid_for(self, imgs: torch.Tensor) -> tuple[int, int]:
        # Learned position embeddings exist for the trained size only; interpolating them would not be faithful.
        s = self.config.img_size
        if tuple(imgs.shape[-2:]) != (s, s):
            raise ValueError(f"this vit-pytorch model takes {s}x{s} images, got {imgs.shape[-2]}x{imgs.shape[-1]}")
        return self.config.grid_size

    def _patch_tokens(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input-space images -> (patches (N, L, p*p*C), patch tokens with positions (N, L, D))."""
        self.grid_for(imgs)
        patches = self.patchify(imgs)
        tokens = self.encoder.to_patch_embedding[1:](patches)  # LN -> Linear -> LN, as vit-pytorch's patch_to_emb
        n_cls = self.config.num_cls_tokens
        return patches, tokens + self.encoder.pos_embedding[:, n_cls:]

    @staticmethod
    def _split(masking: Masking, n: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Our masking -> (visible ids, masked ids) in noise order: vit-pytorch's (unmasked, masked) sets."""
        if masking.noise.shape != (n, length):
            raise ValueError(f"noise {tuple(masking.noise.shape)} does not match tokens {(n, length)}")
        if not 0 < masking.len_keep <= length:
            raise ValueError(f"len_keep must be in 1..{length}, got {masking.len_keep}")
        ids_shuffle = torch.argsort(masking.noise.to(device), dim=1)
        return ids_shuffle[:, : masking.len_keep], ids_shuffle[:, masking.len_keep :]

    # ------------------------------------------------------------------ vit-pytorch's MAE pass
    def forward(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input-space images -> (loss, pred for every patch (N, L, p*p*C) in raster order, mask (N, L))."""
        self.require_decoder()
        return self._mae_pass(imgs, masking)

    def _mae_pass(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches, tokens = self._patch_tokens(imgs)
        n, length, dim = tokens.shape
        visible, masked = self._split(masking, n, length, tokens.device)
        encoded = self.encoder.transformer(torch.gather(tokens, 1, visible[..., None].expand(-1, -1, dim)))
        dec_visible = self.enc_to_dec(encoded) + self.decoder_pos_emb(visible)
        dec_masked = self.mask_token + self.decoder_pos_emb(masked)
        # Back to raster order (vit-pytorch scatters into zeros; a gather by the inverse permutation is the same).
        ids_restore = torch.argsort(torch.cat([visible, masked], dim=1), dim=1)
        x = torch.cat([dec_visible, dec_masked], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        # vit-pytorch decodes every token and keeps the masked ones for the loss; `pred` keeps all of them.
        pred = self.to_pixels(self.decoder(x))
        mask = torch.ones(n, length, device=imgs.device, dtype=imgs.dtype).scatter(1, visible, 0.0)
        # mse_loss over masked patches' values == mean over masked patches of each patch's mean (equal patch_dim).
        per_patch = ((pred - patches) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum().clamp(min=1)
        return loss, pred, mask

    def loss(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """The training loss on input-space images; 0 (vit-pytorch: NaN) when nothing is masked."""
        return self(imgs, masking)[0]

    # ------------------------------------------------------------------ serving entry points
    def forward_embeddings(self, imgs: torch.Tensor, masking: Masking | None) -> EncodeBatch:
        """Input-space images -> tokens after the encoder's final norm, as `ViT.forward` computes them (`encode`).

        CLS (pool='cls') is prepended as in ViT.forward; for pool='mean' `cls` is None. With a masking only the
        visible patches are encoded. Patch tokens come back in raster order.
        """
        _, tokens = self._patch_tokens(imgs)
        n, length, dim = tokens.shape
        if masking is None:
            masking = no_masking(length, n)
        visible, _ = self._split(masking, n, length, tokens.device)
        keep = torch.sort(visible, dim=1).values  # raster order; attention is permutation-equivariant
        x = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, dim))
        n_cls = self.config.num_cls_tokens
        if n_cls:
            x = torch.cat([(self.encoder.cls_token + self.encoder.pos_embedding[:, :n_cls]).expand(n, -1, -1), x], 1)
        x = self.encoder.transformer(x)
        return EncodeBatch(
            cls=x[:, 0] if n_cls else None, patches=x[:, n_cls:], patch_indices=keep, grid=self.config.grid_size
        )

    def forward_prediction(
        self, imgs: torch.Tensor, masking: Masking
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Input-space images -> (every patch's prediction, the mask) (`reconstruct`; vit-pytorch's target is raw
        input-space patches, so the prediction is also the viewer's patches)."""
        grid = self.grid_for(imgs)
        _, pred, mask = self._mae_pass(imgs, masking)
        return pred, mask, grid


# ---------------------------------------------------------------------------------------------- masking
def num_masked_for(num_patches: int, masking_ratio: float) -> int:
    """vit-pytorch's count: int(ratio * L). Our len_keep_for_ratio rounds the other side and can keep one fewer."""
    return int(masking_ratio * num_patches)


def masking_from_rand(rand: torch.Tensor, masking_ratio: float) -> Masking:
    """The Masking equal to vit-pytorch's for the draw `rand = torch.rand(batch, num_patches)`.

    Their unmasked set is rand_indices[:, num_masked:] (the largest r); noise = 1 - r sorts those first.
    """
    length = rand.shape[1]
    return Masking(1.0 - rand, length - num_masked_for(length, masking_ratio))
