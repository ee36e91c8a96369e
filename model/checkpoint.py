"""Weights on disk. The project's own format: safetensors, the MAEConfig as JSON in the metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from model.config import MAEConfig
from model.mae import MAE

FORMAT_TAG = "mae-serve/1"


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message names the problem in one line."""


@dataclass(frozen=True)
class LoadedModel:
    model: MAE
    config: MAEConfig
    path: str
    format: str
    sha256: str


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: MAE, path: str | Path, dtype: torch.dtype | None = None, extra: dict[str, str] | None = None) -> str:
    """Write the project's format; returns the sha256 of the file. `dtype` (e.g. fp16) shrinks storage."""
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict())}
    meta.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return sha256_of(path)


def load_own(path: str | Path) -> LoadedModel:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise CheckpointError(f"{path}: not a {FORMAT_TAG} safetensors file (no config in its metadata)")
    config = MAEConfig.from_dict(json.loads(meta["config"]))
    model = MAE(config)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return LoadedModel(model.eval(), config, str(path), "mae-serve", sha256_of(path))
