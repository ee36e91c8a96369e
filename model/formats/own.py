"""The project's own format: a safetensors file with the MAEConfig as JSON in its metadata.

`save` stores the fixed position tables in fp32 even when the rest is fp16: they are not learned, and rounding them
would shift every token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import MAEConfig
from model.formats.mae_state import FIXED_TABLES, apply_overrides, build
from model.formats.reading import LoadedModel, RawCheckpoint, sha256_of
from model.mae import MAE

FORMAT_TAG = "mae-serve/1"


def save(model: MAE, path: str | Path, dtype: torch.dtype | None = None, extra: dict[str, str] | None = None) -> str:
    """Write the project's format; returns the sha256 of the file. `dtype` (e.g. fp16) shrinks storage."""
    state = {}
    for k, v in model.state_dict().items():
        keep_fp32 = k in FIXED_TABLES
        state[k] = v.detach().to("cpu", torch.float32 if keep_fp32 else (dtype or v.dtype)).contiguous()
    meta = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict())}
    meta.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return sha256_of(path)


def detect(raw: RawCheckpoint) -> LoadedModel | None:
    tag = raw.metadata.get("format", "")
    if not tag.startswith("mae-serve/"):
        return None
    if tag != FORMAT_TAG:
        raise raw.fail(f"format {tag} is not supported by this version (expects {FORMAT_TAG})")
    try:
        config = MAEConfig.from_dict(json.loads(raw.metadata["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise raw.fail(f"invalid config in the metadata: {e}") from None
    return build(raw, raw.state, apply_overrides(raw, config), "mae-serve")
