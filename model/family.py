"""What every model family (the paper's MAE in model/mae.py, vit-pytorch's in model/vit_pytorch_mae.py) shares.

- `MaskedAutoencoder` and `ModelConfig`: the contract the service relies on, as Protocols.
- `PatchGrid` (for configs) and `PatchModel` (for models): the patch plumbing written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

import model.patches as layout
from model.masking import Masking
from model.outputs import EncodeBatch, ReconstructBatch


class DecoderMissingError(RuntimeError):
    """Raised when an encoder-only model is asked to reconstruct."""


class ModelConfig(Protocol):
    """The shape of a model, as the service reads it."""

    @property
    def name(self) -> str: ...
    @property
    def img_size(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def in_chans(self) -> int: ...
    @property
    def embed_dim(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def has_decoder(self) -> bool: ...
    @property
    def has_cls(self) -> bool: ...  # a CLS token (every official MAE; vit-pytorch's pool="mean" has none)
    @property
    def decoder_embed_dim(self) -> int | None: ...
    @property
    def decoder_depth(self) -> int | None: ...
    @property
    def norm_pix_loss(self) -> bool: ...
    @property
    def grid_size(self) -> tuple[int, int]: ...
    @property
    def num_patches(self) -> int: ...
    @property
    def patch_dim(self) -> int: ...


class MaskedAutoencoder(Protocol):
    """A model the service can serve: images in [0, 1] in, typed outputs back."""

    @property
    def family(self) -> str: ...

    @property
    def config(self) -> ModelConfig: ...
    def encode(self, images: torch.Tensor, masking: Masking | None = None) -> EncodeBatch: ...
    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructBatch: ...
    def normalize(self, images: torch.Tensor) -> torch.Tensor: ...
    def num_parameters(self) -> int: ...
    def modules(self) -> Iterator[nn.Module]: ...
    def eval(self) -> nn.Module: ...


class PatchGrid:
    """For a config with img_size, patch_size and in_chans: the patch grid it implies (worked out on first use and
    kept: a request reads these as attributes)."""

    img_size: int
    patch_size: int
    in_chans: int

    @cached_property
    def grid_size(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)

    @cached_property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @cached_property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans


C = TypeVar("C", bound=ModelConfig)


class PatchModel(nn.Module, Generic[C]):
    """Patches, pixel spaces, the decoder check and the two serving entry points, for both families.

    `encode` and `reconstruct` are written here once: pixels in [0, 1] -> the model's input space -> the family's
    own pass (`forward_embeddings`, `forward_prediction`) -> typed outputs. Subclasses set `config`, call
    `register_pixel_stats` in their __init__ and implement the two passes."""

    family: ClassVar[str]
    config: C
    no_decoder_message: ClassVar[str] = "this checkpoint has no pixel decoder: it can embed but not reconstruct"
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def register_pixel_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """How input pixels in [0, 1] were normalised in training (not in the state dict)."""
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C) in the official order (model.patches)."""
        return layout.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) (model.patches); a square grid when none is given."""
        return layout.unpatchify(x, self.patch_size, grid)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the model's input space."""
        return (images - self.pixel_mean.to(images.dtype)).div_(self.pixel_std.to(images.dtype))  # one new tensor

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixel_std.to(x.dtype) + self.pixel_mean.to(x.dtype)

    # ------------------------------------------------------------------ serving entry points
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, masking: Masking | None = None) -> EncodeBatch:
        """Images in [0, 1] -> CLS and patch embeddings after the encoder's final norm. Never runs the decoder.

        Without a masking every patch is encoded. Patch tokens come back in raster order."""
        return self.forward_embeddings(self.normalize(images), masking)

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructBatch:
        """Images in [0, 1] -> predictions for every patch and the images a viewer wants."""
        self.require_decoder()
        imgs = self.normalize(images)
        pred, mask, grid = self.forward_prediction(imgs, masking)
        patches = pred
        if self.config.norm_pix_loss:
            # Undo the per-patch standardisation with each patch's own statistics (see ReconstructBatch).
            target = self.patchify(imgs)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            patches = pred * (var + 1.0e-6) ** 0.5 + mean
        return self.viewer_output(images, patches, pred, mask, grid)

    def forward_embeddings(self, imgs: torch.Tensor, masking: Masking | None) -> EncodeBatch:
        """Input-space images -> the encoder's tokens (the family's pass behind `encode`)."""
        raise NotImplementedError

    def forward_prediction(
        self, imgs: torch.Tensor, masking: Masking
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Input-space images -> (the decoder's prediction for every patch (N, L, p*p*C) in the model's target
        space, the mask (N, L), 1 = masked, the patch grid): the family's pass behind `reconstruct`."""
        raise NotImplementedError

    def viewer_output(
        self, images: torch.Tensor, patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
    ) -> ReconstructBatch:
        """From predicted `patches` in the model's input space to pixels in [0, 1] and the error on masked patches,
        all in patch layout (no image-sized copies). `images` are the originals in [0, 1]; `pred` is kept as it is."""
        c = images.shape[1]
        # The per-channel statistics tiled to the patch layout (p q c): channel fastest.
        std = self.pixel_std.to(patches.dtype).reshape(c).repeat(self.patch_size**2)
        mean = self.pixel_mean.to(patches.dtype).reshape(c).repeat(self.patch_size**2)
        pixels = (patches * std).add_(mean).float().clamp_(0, 1)  # in place: one batch-sized tensor, not three
        err = (pixels - self.patchify(images.float())).square_().mean(dim=-1) * mask.float()
        mse = err.sum(dim=1) / mask.float().sum(dim=1).clamp(min=1)
        return ReconstructBatch(pred=pred, mask=mask, pixels=pixels, images=images, patch_error=err, mse=mse, grid=grid)

    def transformer_stacks(self) -> list[nn.Module]:
        """The modules that hold nearly all the compute (what `torch.compile` is worth applying to)."""
        raise NotImplementedError

    def compile_stacks(self, mode: str) -> int:
        """torch.compile the transformer stacks in place (shapes marked dynamic: batch and visible-patch counts
        vary); mode as torch.compile's (reduce-overhead: CUDA graphs on a GPU). Returns how many were compiled."""
        stacks = self.transformer_stacks()
        for s in stacks:
            s.compile(mode=None if mode == "default" else mode, dynamic=True)
        return len(stacks)

    def require_decoder(self) -> None:
        if not self.config.has_decoder:
            raise DecoderMissingError(self.no_decoder_message)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
