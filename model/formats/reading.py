"""Reading weights from disk, before any format is decided: files and directories -> `RawCheckpoint`.

Pickles are read with ``torch.load(weights_only=True)``; the only extra global allowed is ``argparse.Namespace``
(the ``args`` of official training checkpoints, which holds plain values). Every failure is one `CheckpointError`
line naming the problem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.family import MaskedAutoencoder, ModelConfig

# Globals a weights_only unpickler may build beyond tensors and containers: the official `args`.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message names the problem in one line."""


@dataclass(frozen=True)
class LoadedModel:
    model: MaskedAutoencoder
    config: ModelConfig
    path: str
    format: str
    sha256: str  # of the file; for a directory, of its weights file
    notes: tuple[str, ...] = ()  # what a caller may want to know (e.g. a non-sin-cos position table)


@dataclass
class RawCheckpoint:
    """What was read from disk, before any format is decided."""

    path: Path  # as given: file or directory
    weights_file: Path  # the file hashed
    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    config_json: dict[str, Any] | None = None  # a directory's config.json
    extra: dict[str, Any] = field(default_factory=dict)  # other entries of a .pth wrapper (args, epoch, ...)
    preprocessor: dict[str, Any] | None = None  # HF preprocessor_config.json, for pixel mean/std
    overrides: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def sha256(self) -> str:
        return sha256_of(self.weights_file)

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first(keys: Iterable[str], n: int = 3) -> str:
    """The first few of `keys`, for an error message that names the problem without a wall of keys."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _sniff(path: Path) -> str:
    """'safetensors' or 'torch' from the first bytes; the extension is not trusted."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive, or a legacy torch pickle
        return "torch"
    raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a PyTorch file (starts {head.hex()})")


def torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: our error says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (
            f"needs the global {m.group(1)}, which is not allow-listed"
            if m
            else "uses pickle instructions the safe loader rejects (not a PyTorch checkpoint?)"
        )
        raise CheckpointError(f"{path}: refused: the pickle {what}; nothing was executed") from None
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or not a PyTorch file ({type(e).__name__})") from None


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: {len(bad)} entries are not named tensors ({first(bad)})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(state dict, safetensors metadata, other entries of a .pth wrapper)."""
    if _sniff(path) == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None
        return _tensor_dict(state, path), metadata, {}
    obj = torch_load(path)
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):  # official misc.save_model; Lightning and others
            if isinstance(obj.get(wrapper), Mapping):
                extra = {k: v for k, v in obj.items() if k != wrapper}
                return _tensor_dict(obj[wrapper], path), {}, extra
    return _tensor_dict(obj, path), {}, {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_checkpoint(path: str | Path, **overrides: Any) -> RawCheckpoint:
    """Read a file or a directory (HF or timm layout) without deciding its format."""
    p = Path(path)
    if p.is_dir():
        config_path = p / "config.json"
        weights = next((p / w for w in WEIGHT_FILES if (p / w).is_file()), None)
        if not config_path.is_file() or weights is None:
            sharded = any(p.glob("*.index.json"))
            why = (
                "sharded checkpoints are not supported"
                if sharded
                else "expected config.json with " + " or ".join(WEIGHT_FILES)
            )
            raise CheckpointError(f"{p}: unknown directory layout: {why} (a Hugging Face ViTMAE or timm directory)")
        state, metadata, extra = read_file(weights)
        pre = p / "preprocessor_config.json"
        return RawCheckpoint(
            p,
            weights,
            state,
            metadata,
            _read_json(config_path),
            extra,
            _read_json(pre) if pre.is_file() else None,
            overrides,
        )
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or directory")
    state, metadata, extra = read_file(p)
    return RawCheckpoint(p, p, state, metadata, None, extra, None, overrides)
