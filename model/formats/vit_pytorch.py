"""vit-pytorch: a `vit_pytorch.mae.MAE` state dict (or its `ViT` encoder's) plus a JSON sidecar config.

What the weights cannot tell (heads, image and patch size, pixel normalisation, ...) comes from `<stem>.json` beside
them: `model.pt` -> `model.json` (`SIDECAR_KEYS`, docs/VIT_PYTORCH.md). Everything else is read off the tensors'
shapes, and every inconsistency ends up in one CheckpointError line. The architecture is model/vit_pytorch_mae.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.formats.reading import CheckpointError, LoadedModel, RawCheckpoint, read_file, sha256_of
from model.vit_pytorch_mae import FAMILY, VitPytorchConfig, VitPytorchMAE

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
        raise CheckpointError(
            f"sidecar lacks required keys {missing}" + (f"; {'; '.join(problems)}" if problems else "")
        )
    if side.get("format", FAMILY) != FAMILY:
        problems.append(f"format is {side['format']!r}, expected {FAMILY!r}")
    for k in ("encoder.to_patch_embedding.1.weight", "encoder.transformer.layers.0.0.to_qkv.weight"):
        if k not in state:
            raise CheckpointError(f"the weights lack {k.removeprefix('encoder.')}")

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
                raise CheckpointError(f"the weights have part of an MAE decoder but lack {k}")
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
        raise CheckpointError("; ".join(problems))
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
        raise CheckpointError("weights do not fit the vit-pytorch architecture; " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()})


def build(state: Mapping[str, torch.Tensor], side: Mapping[str, Any], name: str = "vit-pytorch") -> VitPytorchMAE:
    """A ready model (eval mode) from a state_dict and the sidecar's dict."""
    mae_state = _as_mae_keys(state)
    if mae_state is None:
        raise CheckpointError("not a vit-pytorch MAE/ViT state_dict (no encoder.pos_embedding)")
    model = VitPytorchMAE(config_from(mae_state, side, name))
    _load_state(model, mae_state)
    return model.eval()


def load_vit_pytorch(path: str | Path, state: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Weights (.pt/.pth via torch.load(weights_only=True), or .safetensors) + sidecar `<stem>.json` -> model.

    `state` spares re-reading the file when the caller already loaded it for detection.
    """
    path = Path(path)
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise CheckpointError(
            f"{path}: vit-pytorch weights need a sidecar config {side_path.name} beside them with at least "
            "image_size, patch_size, heads, pixel_mean, pixel_std (+ decoder_heads for an MAE); see docs/VIT_PYTORCH.md"
        )
    try:
        side = json.loads(side_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{side_path}: not valid JSON: {e}") from None
    if not isinstance(side, dict):
        raise CheckpointError(f"{side_path}: must hold a JSON object")
    if state is None:
        state = read_file(path)[0]
    try:
        model = build(state, side, name=path.stem)
    except CheckpointError as e:  # one line that names both files
        raise CheckpointError(f"{path} with {side_path.name}: {e}") from None
    return LoadedModel(model, model.config, str(path), FAMILY, sha256_of(path))


def detect(raw: RawCheckpoint) -> LoadedModel | None:
    if raw.config_json is not None or not is_vit_pytorch_state(raw.state):
        return None
    return load_vit_pytorch(raw.weights_file, raw.state)
