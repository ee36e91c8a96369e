"""A model that runs in the model process, as an HTTP worker knows it (app.serving.remote): its shape, from the
catalog, and a stand-in that answers for its description and refuses to compute."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from model.family import PatchGrid
from model.masking import Masking
from model.outputs import EncodeBatch, ReconstructBatch


@dataclass(frozen=True)
class RemoteConfig(PatchGrid):
    """A model's shape as the worker knows it (model.family.ModelConfig), from the model process's catalog."""

    name: str
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    has_decoder: bool
    has_cls: bool
    decoder_embed_dim: int | None
    decoder_depth: int | None
    norm_pix_loss: bool

    @classmethod
    def of(cls, c: Any) -> RemoteConfig:
        return cls(**{f: getattr(c, f) for f in cls.__dataclass_fields__})


class RemoteModel:
    """A model that runs in the model process: here, only its description (its outputs come through the engine)."""

    def __init__(self, config: RemoteConfig, family: str, parameters: int) -> None:
        self._config, self._family, self._parameters = config, family, parameters

    @property
    def family(self) -> str:
        return self._family

    @property
    def config(self) -> RemoteConfig:
        return self._config

    def num_parameters(self) -> int:
        return self._parameters

    def encode(self, images: torch.Tensor, masking: Masking | None = None) -> EncodeBatch:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructBatch:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the model runs in the model process: submit to the engine")

    def modules(self) -> Iterator[torch.nn.Module]:
        return iter(())

    def eval(self) -> torch.nn.Module:
        raise RuntimeError("the model runs in the model process")
