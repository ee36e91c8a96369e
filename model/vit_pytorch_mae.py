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

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from model.mae import DecoderMissingError, EncodeOutput, ReconstructOutput
from model.masking import Masking, no_masking

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel

FAMILY = "vit-pytorch"
LAYER_NORM_EPS = 1e-5  # torch's default, which vit-pytorch uses everywhere

# Sidecar keys: (required, meaning). Everything else about the architecture is read off the tensors' shapes.
SIDECAR_KEYS: dict[str, tuple[bool, str]] = {
    "image_size": (True, "ViT(image_size=...), square, pixels"),
    "patch_size": (True, "ViT(patch_size=...), square, pixels"),
    "heads": (True, "ViT(heads=...)"),
    "dim_head": (False, "ViT(dim_head=...); checked against the weights (qkv width / heads)"),
    "pool": (False, "'cls' or 'mean'; checked against the weights (cls_token)"),
    "channels": (False, "ViT(channels=...), default 3; the server feeds RGB, so it must be 3"),
    "decoder_heads": (True, "MAE(decoder_heads=...) (vit-pytorch's default is 8); only for a state with a decoder"),
    "decoder_dim_head": (False, "MAE(decoder_dim_head=...); checked against the weights"),
    "pixel_mean": (True, "per-channel mean the training images were normalised with (0 if none)"),
    "pixel_std": (True, "per-channel std the training images were normalised with (1 if none)"),
    "masking_ratio": (False, "MAE(masking_ratio=...), informational"),
    "name": (False, "the architecture name /v1/models reports; default: the weights file's stem"),
    "format": (False, "optional marker, must be 'vit-pytorch' when given"),
}

_WRAPPER_KEYS = ("state_dict", "model")  # {'model': state, 'optimizer': ...} style training checkpoints
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


def _checkpoint_error(msg: str) -> Exception:
    # Imported late: model.checkpoint will import this module to wire in detection (import cycle otherwise).
    from model.checkpoint import CheckpointError

    return CheckpointError(msg)


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class VitPytorchConfig:
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
    def grid_size(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def num_cls_tokens(self) -> int:
        return 1 if self.pool == "cls" else 0

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
        for attn, ff in self.layers:
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


class VitPytorchMAE(nn.Module):
    """A vit-pytorch MAE behind model.mae.MAE's serving entry points (encode, reconstruct, loss)."""

    family = FAMILY

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
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(c.pixel_std).view(1, -1, 1, 1), persistent=False)

    # ------------------------------------------------------------------ shapes and spaces
    def grid_for(self, imgs: torch.Tensor) -> tuple[int, int]:
        # Learned position embeddings exist for the trained size only; interpolating them would not be faithful.
        s = self.config.img_size
        if tuple(imgs.shape[-2:]) != (s, s):
            raise ValueError(f"this vit-pytorch model takes {s}x{s} images, got {imgs.shape[-2]}x{imgs.shape[-1]}")
        return self.config.grid_size

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """vit-pytorch's own patch order, (N, C, H, W) -> (N, L, p*p*C); also model.mae.MAE's order."""
        return self.encoder.to_patch_embedding[0](imgs)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = grid or self.config.grid_size
        p = self.config.patch_size
        return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=p, p2=p)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the input space the model was trained in (from the sidecar)."""
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixel_std.to(x.dtype) + self.pixel_mean.to(x.dtype)

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
        ids_shuffle = torch.argsort(masking.noise.to(device), dim=1)
        return ids_shuffle[:, : masking.len_keep], ids_shuffle[:, masking.len_keep :]

    # ------------------------------------------------------------------ vit-pytorch's MAE pass
    def forward(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input-space images -> (loss, pred for every patch (N, L, p*p*C) in raster order, mask (N, L))."""
        self._require_decoder()
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
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, masking: Masking | None = None) -> EncodeOutput:
        """Images in [0, 1] -> tokens after the encoder's final norm, as `ViT.forward` computes them.

        CLS (pool='cls') is prepended as in ViT.forward; for pool='mean' `cls` is None. With a masking only the
        visible patches are encoded. Patch tokens come back in raster order.
        """
        imgs = self.normalize(images)
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
        return EncodeOutput(
            cls=x[:, 0] if n_cls else None, patches=x[:, n_cls:], patch_indices=keep, grid=self.config.grid_size
        )

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructOutput:
        """Images in [0, 1] -> every patch's prediction and the images a viewer wants (as MAE.reconstruct)."""
        self._require_decoder()
        imgs = self.normalize(images)
        grid = self.grid_for(imgs)
        _, pred, mask = self(imgs, masking)
        return ReconstructOutput.from_prediction(self, images, pred, pred, mask, grid)

    def _require_decoder(self) -> None:
        if not self.config.has_decoder:
            raise DecoderMissingError(
                "this checkpoint is a vit-pytorch ViT without the MAE decoder: it can embed but not reconstruct"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


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


# ---------------------------------------------------------------------------------------------- loading
def _unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    """Strip training-checkpoint wrappers and module prefixes so detection and loading see bare keys."""
    for key in _WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = inner
            break
    out: dict[str, Any] = {}
    for k, v in state.items():
        for prefix in _PREFIXES:
            if isinstance(k, str) and k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _as_mae_keys(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Keys of an MAE state (a ViT's keys gain 'encoder.'), without the classifier; None if not vit-pytorch."""
    state = _unwrap(state)
    if "encoder.pos_embedding" in state and "encoder.to_patch_embedding.2.weight" in state:
        pass
    elif "pos_embedding" in state and "to_patch_embedding.2.weight" in state and "transformer.norm.weight" in state:
        state = {f"encoder.{k}": v for k, v in state.items()}
    else:
        return None
    # mlp_head: the ViT's classifier, not served. patch_to_emb.*: vit-pytorch's MAE re-registers the encoder's
    # patch-embedding modules under that name, so its state_dict repeats encoder.to_patch_embedding.{1,2,3}.
    return {k: v for k, v in state.items() if not k.startswith(("encoder.mlp_head.", "patch_to_emb."))}


def is_vit_pytorch_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a state_dict of vit_pytorch's MAE (ViT encoder) or of its ViT alone."""
    try:
        return _as_mae_keys(state) is not None
    except Exception:  # detection must never raise on someone else's format
        return False


def sidecar_path(weights: str | Path) -> Path:
    """`model.pt` / `model.pth` / `model.safetensors` -> `model.json` beside it."""
    return Path(weights).with_suffix(".json")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise _checkpoint_error(f"{path}: cannot read as safetensors: {type(e).__name__}: {e}") from None
    try:
        # weights_only: a .pt from the internet must not run code when loaded.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _checkpoint_error(f"{path}: cannot read as a torch state_dict: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise _checkpoint_error(f"{path}: holds a {type(obj).__name__}, not a state_dict (save model.state_dict())")
    return dict(obj)


def _pair_int(v: Any, key: str, problems: list[str]) -> int | None:
    if isinstance(v, list | tuple) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        problems.append(f"{key} must be a positive integer (square only), got {v!r}")
        return None
    return v


def _channel_stats(v: Any, key: str, channels: int, problems: list[str]) -> tuple[float, ...]:
    vals = [v] * channels if isinstance(v, int | float) and not isinstance(v, bool) else v
    if not isinstance(vals, list | tuple) or len(vals) != channels or not all(isinstance(x, int | float) for x in vals):
        problems.append(f"{key} must be a number or a list of {channels} numbers, got {v!r}")
        return (0.0,) * channels
    if key == "pixel_std" and any(x <= 0 for x in vals):
        problems.append(f"pixel_std must be > 0, got {v!r}")
    return tuple(float(x) for x in vals)


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pat.match(k))})


def _heads(
    state: Mapping[str, torch.Tensor], prefix: str, side: Mapping[str, Any], hkey: str, dkey: str, problems: list[str]
) -> tuple[int, int]:
    """(heads, dim_head): heads from the sidecar, dim_head = qkv width / heads (checked if the sidecar gives it)."""
    inner = state[f"{prefix}layers.0.0.to_qkv.weight"].shape[0] // 3
    heads = side.get(hkey)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        problems.append(f"{hkey} must be a positive integer, got {heads!r}")
        return 1, inner
    if inner % heads:
        problems.append(f"{hkey}={heads} does not divide the attention width {inner} of the weights")
        return heads, inner
    dim_head = side.get(dkey, inner // heads)
    if isinstance(dim_head, bool) or not isinstance(dim_head, int):
        problems.append(f"{dkey} must be an integer, got {dim_head!r}")
    elif heads * dim_head != inner:
        problems.append(f"{hkey} * {dkey} = {heads} * {dim_head} = {heads * dim_head}, the weights have {inner}")
    return heads, inner // heads


def config_from(state: Mapping[str, torch.Tensor], side: Mapping[str, Any], name: str) -> VitPytorchConfig:
    """Sidecar + tensor shapes -> config. Every problem found ends up in one CheckpointError line."""
    problems: list[str] = []
    unknown = sorted(set(side) - set(SIDECAR_KEYS))
    if unknown:
        problems.append(f"unknown sidecar keys {unknown} (known: {', '.join(SIDECAR_KEYS)})")
    has_decoder = any(k.startswith(("decoder.", "to_pixels.", "mask_token", "decoder_pos_emb.")) for k in state)
    required = [k for k, (req, _) in SIDECAR_KEYS.items() if req and (has_decoder or not k.startswith("decoder_"))]
    missing = [k for k in required if k not in side]
    if missing:
        raise _checkpoint_error(
            f"sidecar lacks required keys {missing}" + (f"; {'; '.join(problems)}" if problems else "")
        )
    if side.get("format", FAMILY) != FAMILY:
        problems.append(f"format is {side['format']!r}, expected {FAMILY!r}")
    for k in ("encoder.to_patch_embedding.1.weight", "encoder.transformer.layers.0.0.to_qkv.weight"):
        if k not in state:
            raise _checkpoint_error(f"the weights lack {k.removeprefix('encoder.')}")

    pos = state["encoder.pos_embedding"]
    embed_dim, pos_len = pos.shape[-1], pos.shape[-2]
    patch_dim = state["encoder.to_patch_embedding.1.weight"].shape[0]
    n_cls = state["encoder.cls_token"].shape[1] if "encoder.cls_token" in state else None
    channels = side.get("channels", 3)
    if channels != 3:
        problems.append(f"channels must be 3 (the server feeds RGB images), got {channels!r}")
        channels = 3
    img = _pair_int(side["image_size"], "image_size", problems)
    p = _pair_int(side["patch_size"], "patch_size", problems)
    num_patches = 0
    if img and p:
        if img % p:
            problems.append(f"image_size {img} is not a multiple of patch_size {p}")
        num_patches = (img // p) ** 2
        if channels * p * p != patch_dim:
            problems.append(f"channels * patch_size^2 = {channels * p * p}, the patch embedding takes {patch_dim}")
    pool = side.get("pool", "cls" if n_cls == 1 or (n_cls is None and pos_len == num_patches + 1) else "mean")
    if pool not in ("cls", "mean"):
        problems.append(f"pool must be 'cls' or 'mean', got {pool!r}")
    want_cls = 1 if pool == "cls" else 0
    if n_cls is not None and n_cls != want_cls:
        problems.append(f"pool={pool!r} but the weights' cls_token holds {n_cls} token(s)")
    if num_patches and pos_len != num_patches + want_cls:
        problems.append(
            f"pos_embedding has {pos_len} positions, ({img}/{p})^2 patches + {want_cls} cls = {num_patches + want_cls}"
        )
    heads, dim_head = _heads(state, "encoder.transformer.", side, "heads", "dim_head", problems)

    dec: dict[str, Any] = dict(
        decoder_embed_dim=None,
        decoder_depth=None,
        decoder_num_heads=None,
        decoder_dim_head=None,
        decoder_mlp_dim=None,
        decoder_pos_rows=None,
    )
    has_enc_to_dec = "enc_to_dec.weight" in state
    if has_decoder:
        for k in ("mask_token", "decoder_pos_emb.weight", "to_pixels.weight", "decoder.layers.0.0.to_qkv.weight"):
            if k not in state:
                raise _checkpoint_error(f"the weights have part of an MAE decoder but lack {k}")
        dd = state["mask_token"].shape[-1]
        dh, ddh = _heads(state, "decoder.", side, "decoder_heads", "decoder_dim_head", problems)
        dec = dict(
            decoder_embed_dim=dd,
            decoder_depth=_layer_count(state, "decoder."),
            decoder_num_heads=dh,
            decoder_dim_head=ddh,
            decoder_mlp_dim=state["decoder.layers.0.1.net.1.weight"].shape[0]
            if "decoder.layers.0.1.net.1.weight" in state
            else 4 * dd,
        )
        rows, width = state["decoder_pos_emb.weight"].shape
        dec["decoder_pos_rows"] = rows
        if num_patches and (rows not in (num_patches, pos_len) or width != dd):
            problems.append(f"decoder_pos_emb is {(rows, width)}, expected ({num_patches} or {pos_len}, {dd})")
        if tuple(state["to_pixels.weight"].shape) != (patch_dim, dd):
            problems.append(f"to_pixels is {tuple(state['to_pixels.weight'].shape)}, expected ({patch_dim}, {dd})")
        if not has_enc_to_dec and dd != embed_dim:
            problems.append(f"no enc_to_dec but decoder dim {dd} != encoder dim {embed_dim}")
    mean = _channel_stats(side["pixel_mean"], "pixel_mean", channels, problems)
    std = _channel_stats(side["pixel_std"], "pixel_std", channels, problems)
    ratio = side.get("masking_ratio")
    if ratio is not None and not (isinstance(ratio, int | float) and 0 < ratio < 1):
        problems.append(f"masking_ratio must be in (0, 1), got {ratio!r}")
    if problems:
        raise _checkpoint_error("; ".join(problems))
    mlp_key = "encoder.transformer.layers.0.1.net.1.weight"
    return VitPytorchConfig(
        name=str(side.get("name", name)),
        img_size=img or 0,
        patch_size=p or 0,
        in_chans=channels,
        embed_dim=embed_dim,
        depth=_layer_count(state, "encoder.transformer."),
        num_heads=heads,
        dim_head=dim_head,
        mlp_dim=state[mlp_key].shape[0] if mlp_key in state else 4 * embed_dim,
        pool=pool,
        has_decoder=has_decoder,
        has_enc_to_dec=has_enc_to_dec,
        pixel_mean=mean,
        pixel_std=std,
        masking_ratio=None if ratio is None else float(ratio),
        **dec,
    )


def _load_state(model: VitPytorchMAE, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load with a one-line error naming the first few missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if parts:
        raise _checkpoint_error("weights do not fit the vit-pytorch architecture; " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()})


def build(state: Mapping[str, torch.Tensor], side: Mapping[str, Any], name: str = "vit-pytorch") -> VitPytorchMAE:
    """A ready model (eval mode) from a state_dict and the sidecar's dict."""
    mae_state = _as_mae_keys(state)
    if mae_state is None:
        raise _checkpoint_error("not a vit-pytorch MAE/ViT state_dict (no encoder.pos_embedding)")
    model = VitPytorchMAE(config_from(mae_state, side, name))
    _load_state(model, mae_state)
    return model.eval()


def load_vit_pytorch(path: str | Path, state: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Weights (.pt/.pth via torch.load(weights_only=True), or .safetensors) + sidecar `<stem>.json` -> model.

    `state` spares re-reading the file when the caller already loaded it for detection.
    """
    from model.checkpoint import CheckpointError, LoadedModel, sha256_of

    path = Path(path)
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise _checkpoint_error(
            f"{path}: vit-pytorch weights need a sidecar config {side_path.name} beside them with at least "
            "image_size, patch_size, heads, pixel_mean, pixel_std (+ decoder_heads for an MAE); see docs/VIT_PYTORCH.md"
        )
    try:
        side = json.loads(side_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _checkpoint_error(f"{side_path}: not valid JSON: {e}") from None
    if not isinstance(side, dict):
        raise _checkpoint_error(f"{side_path}: must hold a JSON object")
    if state is None:
        state = _read_weights(path)
    try:
        model = build(state, side, name=path.stem)
    except CheckpointError as e:  # one line that names both files
        raise CheckpointError(f"{path} with {side_path.name}: {e}") from None
    return LoadedModel(model, model.config, str(path), FAMILY, sha256_of(path))  # type: ignore[arg-type]
