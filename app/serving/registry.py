"""The loaded models: name -> model on its device and dtype, with what /v1/models reports about it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from app.serving.cpu_kernels import CpuKernels, prepare_cpu_kernels
from app.settings import Settings
from model.config import get_config
from model.family import MaskedAutoencoder, ModelConfig, PatchModel
from model.formats import CheckpointError, LoadedModel, load
from model.mae import MAE

log = logging.getLogger("mae.registry")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """Startup cannot go on: the message is the one line the operator sees."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"MAE_DEVICE={spec} but no CUDA device is available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        # bf16 halves memory and is fast on GPUs; on CPUs it is several times slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: MaskedAutoencoder
    path: str
    format: str
    sha256: str
    device: torch.device
    dtype: torch.dtype
    random_init: bool = False

    @cached_property
    def config(self) -> ModelConfig:
        return self.model.config

    def describe(self) -> dict[str, Any]:
        """What /v1/models says of this model (app.http.schemas.ModelInfo's fields, but the batch cap)."""
        c = self.config
        return dict(
            name=self.name,
            family=self.model.family,
            architecture=c.name,
            image_size=c.img_size,
            patch_size=c.patch_size,
            grid=list(c.grid_size),
            num_patches=c.num_patches,
            embed_dim=c.embed_dim,
            depth=c.depth,
            decoder_embed_dim=c.decoder_embed_dim if c.has_decoder else None,
            decoder_depth=c.decoder_depth if c.has_decoder else None,
            parameters=self.model.num_parameters(),
            norm_pix_loss=c.norm_pix_loss,
            has_decoder=c.has_decoder,
            weights_path=self.path,
            weights_format=self.format,
            weights_sha256=self.sha256,
            random_init=self.random_init,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )


def _load_one(name: str, path: str) -> LoadedModel:
    if not Path(path).exists():
        raise ModelLoadError(f"model {name!r}: weights not found at {path}")
    try:
        return load(path)
    except CheckpointError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from None
    except Exception as e:  # any other failure still ends as one line
        raise ModelLoadError(f"model {name!r}: cannot load {path}: {type(e).__name__}: {e}") from None


class Registry:
    def __init__(self, entries: dict[str, ModelEntry]) -> None:
        if not entries:
            raise ModelLoadError("no models configured")
        self.entries = entries
        self.default = next(iter(entries))
        # The largest patch count of the loaded models: no mask may name more patches than this.
        self.max_patches = max(e.config.num_patches for e in entries.values())

    def get(self, name: str | None) -> ModelEntry:
        return self.entries[name or self.default]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """Load every model onto its device and dtype (run it on the model thread: see app.serving.model_thread)."""
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        entries: dict[str, ModelEntry] = {}
        for name, path in settings.weight_specs():
            if not settings.weights.strip() and not Path(path).exists():
                entries[name] = cls._random_demo(name, device, dtype, settings.cpu_kernels, settings.compile != "off")
                continue
            loaded = _load_one(name, path)
            model = _place(loaded.model, device, dtype, settings.cpu_kernels, name, settings.compile != "off")
            if settings.compile != "off" and isinstance(model, PatchModel):
                n = model.compile_stacks(settings.compile)
                log.info("%s: %d transformer stacks compiled (MAE_COMPILE=%s)", name, n, settings.compile)
            entries[name] = ModelEntry(name, model, loaded.path, loaded.format, loaded.sha256, device, dtype)
            log.info(
                "loaded %s from %s (%s, sha256 %s) on %s/%s", name, path, loaded.format, loaded.sha256, device, dtype
            )
        return cls(entries)

    @staticmethod
    def _random_demo(
        name: str, device: torch.device, dtype: torch.dtype, kernels: CpuKernels, compiled: bool
    ) -> ModelEntry:
        log.warning("!" * 72)
        log.warning("NO BUNDLED WEIGHTS FOUND: serving a RANDOMLY INITIALISED model. Reconstructions are noise.")
        log.warning("Train one (README: 'Train the bundled model') or set MAE_WEIGHTS.")
        log.warning("!" * 72)
        torch.manual_seed(0)
        model = _place(MAE(get_config("mae_vit_demo_patch16")), device, dtype, kernels, name, compiled)
        return ModelEntry(name, model, "(random init)", "random", "none", device, dtype, random_init=True)


def _place(
    model: MaskedAutoencoder,
    device: torch.device,
    dtype: torch.dtype,
    kernels: CpuKernels,
    name: str,
    compiled: bool = False,
) -> MaskedAutoencoder:
    """The model on its device and dtype, in eval mode, with the CPU kernels MAE_CPU_KERNELS asks for (`compiled`:
    MAE_COMPILE is on, and inductor chooses the compiled stacks' kernels)."""
    assert isinstance(model, torch.nn.Module)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and dtype == torch.float32:
        n = prepare_cpu_kernels(model, kernels, compiled)
        used = ("onednn" if kernels == "auto" else kernels) if n else "stock"
        log.info("%s: fp32 linear layers on %s kernels (MAE_CPU_KERNELS=%s)", name, used, kernels)
    return model
