"""Weights on disk: the project's own format, and the MAE checkpoints people actually have, behind one `load()`.

`load(path)` reads a file or directory into a raw state dict (`reading.read_checkpoint`), then hands it to
`DETECTORS`, one per format, tried in order; the first that recognises the layout builds the model:

- ``mae-serve`` (own.py): the project's own safetensors file, the MAEConfig as JSON in its metadata (`save`).
- ``hf-vitmae`` (hf.py): a Hugging Face ViTMAEForPreTraining / ViTMAEModel directory.
- ``timm`` (timm.py): a timm VisionTransformer ``.mae`` encoder. Encoder only.
- ``vit-pytorch`` (vit_pytorch.py): lucidrains' vit-pytorch MAE (or ViT) + a sidecar config.
- ``mae-official`` (official.py): the facebookresearch/mae layout, ``.pth`` or bare state dicts.

A detector returns None when the layout is not its own, and raises CheckpointError when it is but is broken. Every
failure is one `CheckpointError` line naming the problem, never a wall of key names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from model.config import MAEConfig
from model.formats import hf, official, own, timm, vit_pytorch
from model.formats.own import FORMAT_TAG, save
from model.formats.reading import CheckpointError, LoadedModel, RawCheckpoint, first, read_checkpoint, sha256_of

Detector = Callable[[RawCheckpoint], LoadedModel | None]

# Tried in order; the first that recognises the layout wins. Add a family here (one line).
DETECTORS: list[Detector] = [own.detect, hf.detect, timm.detect, vit_pytorch.detect, official.detect]


def load(path: str | Path, **overrides: Any) -> LoadedModel:
    """Load any supported checkpoint as an fp32 model in eval mode.

    `overrides` replace MAEConfig fields after inference: num_heads / decoder_num_heads for files whose heads
    cannot be inferred, norm_pix_loss for official files saved without their `args`, pixel_mean / pixel_std.
    """
    known = {f.name for f in fields(MAEConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown config overrides: {', '.join(sorted(set(overrides) - known))}")
    raw = read_checkpoint(path, **overrides)
    for detect in DETECTORS:
        loaded = detect(raw)
        if loaded is not None:
            return loaded
    if raw.config_json is not None:
        raise raw.fail(
            "unknown directory layout: config.json is neither a Hugging Face ViTMAE (model_type 'vit_mae') nor "
            f"a timm config ('architecture'); model_type={raw.config_json.get('model_type')!r}"
        )
    raise raw.fail(f"unrecognised checkpoint layout ({len(raw.state)} tensors: {first(sorted(raw.state))})")


def load_own(path: str | Path) -> LoadedModel:
    """Load a file that must be in the project's format."""
    loaded = load(path)
    if loaded.format != "mae-serve":
        raise CheckpointError(f"{path}: not a {FORMAT_TAG} file (it is {loaded.format})")
    return loaded


__all__ = [
    "DETECTORS",
    "FORMAT_TAG",
    "CheckpointError",
    "Detector",
    "LoadedModel",
    "RawCheckpoint",
    "load",
    "load_own",
    "read_checkpoint",
    "save",
    "sha256_of",
]
