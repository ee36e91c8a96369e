"""One dataclass describes an MAE; named configs cover the paper's models and our small ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from model.family import PatchGrid

# ImageNet statistics: the official models (and the HF port) were trained on inputs normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MAEConfig(PatchGrid):
    """Hyper-parameters of an MAE. Names follow facebookresearch/mae `MaskedAutoencoderViT`."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    # The official code uses 1e-6; the Hugging Face port's configs say 1e-12. Kept so either loads exactly.
    layer_norm_eps: float = 1e-6
    norm_pix_loss: bool = False
    # False for encoder-only checkpoints (mae_pretrain_*, timm): they embed but cannot reconstruct.
    has_decoder: bool = True
    # How input pixels in [0, 1] were normalised for this model.
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for dim, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"),
        ):
            if dim % heads:
                raise ValueError(f"{what} {dim} is not divisible by its {heads} heads")
            if dim % 4:
                raise ValueError(f"{what} {dim} must be a multiple of 4 for the 2-D sin-cos table")

    @property
    def has_cls(self) -> bool:
        return True  # the paper's encoder always prepends one

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MAE config keys: {', '.join(unknown)}")
        d = dict(d)
        for k in ("pixel_mean", "pixel_std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> MAEConfig:
        return replace(self, **changes)


_PAPER_DECODER: dict[str, Any] = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

CONFIGS: dict[str, MAEConfig] = {
    # The paper's models (facebookresearch/mae models_mae.py).
    "mae_vit_base_patch16": MAEConfig(
        name="mae_vit_base_patch16", embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER
    ),
    "mae_vit_large_patch16": MAEConfig(
        name="mae_vit_large_patch16", embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER
    ),
    "mae_vit_huge_patch14": MAEConfig(
        name="mae_vit_huge_patch14", patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER
    ),
    # The bundled demo model: ViT-Tiny-like encoder, narrow decoder, trainable on a 2-core CPU in hours.
    "mae_vit_demo_patch16": MAEConfig(
        name="mae_vit_demo_patch16",
        embed_dim=192,
        depth=8,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # For tests: runs in milliseconds.
    "mae_test": MAEConfig(
        name="mae_test",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
}


def get_config(name: str) -> MAEConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}") from None
