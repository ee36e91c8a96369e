"""Weights on disk: the project's own format, and the MAE checkpoints people actually have.

`load(path)` reads a file or directory into a raw state dict (`RawCheckpoint`), then hands it to `DETECTORS`,
an ordered list of functions, one per format; the first that recognises the layout builds the model:

- ``mae-serve``: the project's own safetensors file, the MAEConfig as JSON in its metadata (`save`).
- ``hf-vitmae``: a Hugging Face ViTMAEForPreTraining / ViTMAEModel directory (config.json + model.safetensors or
  pytorch_model.bin). Both the hub's legacy key names (``vit.encoder.layer.N.attention.attention.query``,
  ``decoder.decoder_layers.N``) and transformers 5.x names (``layers.N.attention.q_proj``, and the
  ``decoder.decoder_encoder.layer.N`` that 5.x's save_pretrained writes) are read; q, k, v become one qkv.
- ``timm``: a timm VisionTransformer ``.mae`` encoder (directory with timm's config.json, or a bare file that
  carries timm's ``head``/``fc_norm`` keys). Encoder only.
- ``mae-official``: facebookresearch/mae layout (our own key names), a ``.pth`` saved by misc.save_model
  (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``) or a bare state dict in .pth/.safetensors. Files
  without decoder keys (``mae_pretrain_*``) load encoder-only.

Decisions, for every format:

- Pickles are read with ``torch.load(weights_only=True)``; the only extra global allowed is
  ``argparse.Namespace`` (the ``args`` of official training checkpoints, which holds plain values).
- Heads cannot be read from shapes. In order: an explicit override (``load(path, num_heads=...)``), the
  checkpoint's own config (HF config.json, timm model_args/architecture, official ``args.model``), a named
  config in `model.config.CONFIGS` whose every shape matches, the paper's table (768 -> 12, 1024 -> 16,
  1280 -> 16; decoder 512 -> 16), and last a head dimension of 64 (the paper's). Otherwise: an error asking
  for the override.
- Position tables (pos_embed, decoder_pos_embed) are loaded from the file into the buffers, as the official
  ``load_state_dict`` and transformers do, so a checkpoint behaves exactly as in its reference implementation.
  A table that is not the 2-D sin-cos table (beyond fp16 rounding) is kept and reported in
  `LoadedModel.notes`; a missing table is filled with the sin-cos table. `save` stores these tables in fp32
  even when the rest is fp16: they are not learned, and rounding them would shift every token.
- Every failure is one `CheckpointError` line naming the problem, never a wall of key names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import CONFIGS, MAEConfig
from model.mae import MAE

FORMAT_TAG = "mae-serve/1"
# Fixed (not learned) tables: kept in fp32 by `save`, loaded from the file, checked against sin-cos.
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")
# Globals a weights_only unpickler may build beyond tensors and containers: the official `args`.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
# Heads by width (paper, Table/Appendix A.1); the decoder of every released model is 512-d with 16 heads.
PAPER_HEADS = {768: 12, 1024: 16, 1280: 16}
PAPER_DECODER_HEADS = {512: 16}
FALLBACK_HEAD_DIM = 64
# timm ViT names -> heads, for timm directories whose config.json has no model_args.
TIMM_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_huge": 16, "vit_giant": 16}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message names the problem in one line."""


@dataclass(frozen=True)
class LoadedModel:
    model: MAE | Any  # another family (model/vit_pytorch_mae.py) returns its own model with the same entry points
    config: MAEConfig | Any
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

    def loaded(self, model: MAE, fmt: str, notes: Iterable[str] = ()) -> LoadedModel:
        return LoadedModel(model.eval(), model.config, str(self.path), fmt, self.sha256, tuple(notes))


# A detector returns None when the layout is not its own, and raises CheckpointError when it is but is broken.
Detector = Callable[[RawCheckpoint], LoadedModel | None]


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- own format
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


def load_own(path: str | Path) -> LoadedModel:
    """Load a file that must be in the project's format."""
    loaded = load(path)
    if loaded.format != "mae-serve":
        raise CheckpointError(f"{path}: not a {FORMAT_TAG} file (it is {loaded.format})")
    return loaded


def _detect_own(raw: RawCheckpoint) -> LoadedModel | None:
    tag = raw.metadata.get("format", "")
    if not tag.startswith("mae-serve/"):
        return None
    if tag != FORMAT_TAG:
        raise raw.fail(f"format {tag} is not supported by this version (expects {FORMAT_TAG})")
    try:
        config = MAEConfig.from_dict(json.loads(raw.metadata["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise raw.fail(f"invalid config in the metadata: {e}") from None
    return _build(raw, raw.state, _apply_overrides(raw, config), "mae-serve")


# ---------------------------------------------------------------------------------------------- Hugging Face
_HF_ENC_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_DEC_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_MODULES = {
    "attention.attention.query": "q",
    "attention.q_proj": "q",
    "attention.attention.key": "k",
    "attention.k_proj": "k",
    "attention.attention.value": "v",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}


def _is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def hf_to_official(state: Mapping[str, torch.Tensor], raw: RawCheckpoint) -> dict[str, torch.Tensor]:
    """HF ViTMAE keys (hub legacy or transformers 5.x) -> facebookresearch/mae keys, q/k/v fused into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        top = _HF_TOP.get(key[4:] if key.startswith("vit.") else key)
        if top is not None:
            out[top] = value
            continue
        m = _HF_ENC_LAYER.match(key) or _HF_DEC_LAYER.match(key)
        target = _HF_LAYER_MODULES.get(m.group(2)) if m else None
        if target is None:
            unknown.append(key)
            continue
        block = f"{'decoder_blocks' if key.startswith('decoder.') else 'blocks'}.{m.group(1)}"
        if target in ("q", "k", "v"):
            qkv.setdefault((block, m.group(3)), {})[target] = value
        else:
            out[f"{block}.{target}.{m.group(3)}"] = value
    if unknown:
        raise raw.fail(f"{len(unknown)} keys unknown to the ViTMAE layout ({_first(unknown)})")
    for (block, param), parts in qkv.items():
        absent = [name for p, name in zip("qkv", ("query", "key", "value"), strict=True) if p not in parts]
        if absent:
            raise raw.fail(f"{block} attention has no {' or '.join(absent)} {param}: incomplete qkv weights")
        out[f"{block}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _square(value: Any, what: str, raw: RawCheckpoint) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise raw.fail(f"non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _detect_hf(raw: RawCheckpoint) -> LoadedModel | None:
    cj = raw.config_json
    claims = cj is not None and cj.get("model_type") == "vit_mae"
    if not claims and not (cj is None and _is_hf_layout(raw.state)):
        return None
    if not _is_hf_layout(raw.state):
        raise raw.fail("config.json says vit_mae but the weights are not in the ViTMAE layout")
    state = hf_to_official(raw.state, raw)
    if cj is None:  # a bare HF state dict: shapes, and HF's default eps
        has_decoder = _has_decoder_keys(state)
        config = _infer_config(raw, state, has_decoder=has_decoder, eps=1e-12)
        return _build(raw, state, config, "hf-vitmae")
    if cj.get("hidden_act", "gelu") != "gelu":
        raise raw.fail(f"hidden_act {cj['hidden_act']!r} is not supported (the MAE uses exact gelu)")
    if not cj.get("qkv_bias", True):
        raise raw.fail("qkv_bias=false is not supported (the MAE's attention has a qkv bias)")
    hidden, dec_hidden = int(cj.get("hidden_size", 768)), int(cj.get("decoder_hidden_size", 512))
    ratio = int(cj.get("intermediate_size", 3072)) / hidden
    dec_ratio = int(cj.get("decoder_intermediate_size", 2048)) / dec_hidden
    # A ViTMAEForPreTraining file claims a decoder; ViTMAEModel files have none.
    has_decoder = _has_decoder_keys(state) or "ViTMAEForPreTraining" in (cj.get("architectures") or [])
    if has_decoder and not math.isclose(ratio, dec_ratio):
        raise raw.fail(f"encoder MLP ratio {ratio:g} differs from the decoder's {dec_ratio:g}; not supported")
    values: dict[str, Any] = dict(
        img_size=_square(cj.get("image_size", 224), "image_size", raw),
        patch_size=_square(cj.get("patch_size", 16), "patch_size", raw),
        in_chans=int(cj.get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(cj.get("num_hidden_layers", 12)),
        num_heads=int(cj.get("num_attention_heads", 12)),
        mlp_ratio=ratio,
        layer_norm_eps=float(cj.get("layer_norm_eps", 1e-12)),
        norm_pix_loss=bool(cj.get("norm_pix_loss", False)),
        has_decoder=has_decoder,
        name=raw.path.name,
    )
    if has_decoder:
        values.update(
            decoder_embed_dim=dec_hidden,
            decoder_depth=int(cj.get("decoder_num_hidden_layers", 8)),
            decoder_num_heads=int(cj.get("decoder_num_attention_heads", 16)),
        )
    pre = raw.preprocessor or {}
    if pre.get("image_mean") and pre.get("image_std"):
        values.update(pixel_mean=tuple(pre["image_mean"]), pixel_std=tuple(pre["image_std"]))
    return _build(raw, state, _make_config(raw, values), "hf-vitmae")


# ---------------------------------------------------------------------------------------------- timm
def _detect_timm(raw: RawCheckpoint) -> LoadedModel | None:
    cj = raw.config_json
    timm_keys = [k for k in raw.state if k.split(".")[0] in ("head", "fc_norm")]
    bare_timm = cj is None and timm_keys and "cls_token" in raw.state and not _has_decoder_keys(raw.state)
    if not ((cj is not None and "architecture" in cj) or bare_timm):
        return None
    arch = str((cj or {}).get("architecture", "vit"))
    if not arch.startswith("vit"):
        raise raw.fail(f"timm architecture {arch!r} is not a plain ViT; only ViT (.mae) encoders are supported")
    state = dict(raw.state)
    notes = []
    for k in timm_keys:
        t = state.pop(k)
        if k.startswith("fc_norm") and t.numel():
            # fc_norm replaces the final norm in timm's avg-pool models: not the MAE encoder's output.
            raise raw.fail("has fc_norm (a global-average-pool fine-tuned ViT), not an MAE pre-trained encoder")
        if t.numel():
            notes.append(f"ignored {k} {tuple(t.shape)} (a classifier head, not part of the MAE encoder)")
    if _has_decoder_keys(state):
        raise raw.fail("a timm ViT has no MAE decoder, yet the file has decoder keys")
    hints: dict[str, Any] = {}
    model_args = (cj or {}).get("model_args") or {}
    pretrained = (cj or {}).get("pretrained_cfg") or {}
    if "num_heads" in model_args:
        hints["num_heads"] = int(model_args["num_heads"])
    else:
        for prefix, heads in TIMM_HEADS.items():
            if arch.startswith(prefix + "_"):
                hints["num_heads"] = heads
    if pretrained.get("input_size"):
        hints["img_size"] = int(pretrained["input_size"][-1])
    if pretrained.get("mean") and pretrained.get("std"):
        hints["pixel_mean"], hints["pixel_std"] = tuple(pretrained["mean"]), tuple(pretrained["std"])
    name = arch if cj is not None else None
    config = _infer_config(raw, state, has_decoder=False, eps=1e-6, name=name, hints=hints)
    return _build(raw, state, config, "timm", notes)


# ---------------------------------------------------------------------------------------------- official
def _detect_official(raw: RawCheckpoint) -> LoadedModel | None:
    if "patch_embed.proj.weight" not in raw.state and "blocks.0.attn.qkv.weight" not in raw.state:
        return None
    hints: dict[str, Any] = {}
    args = raw.extra.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    if isinstance(args.get("norm_pix_loss"), bool):
        hints["norm_pix_loss"] = args["norm_pix_loss"]
    if isinstance(args.get("model"), str):
        # models_mae names: mae_vit_base_patch16 is an alias of mae_vit_base_patch16_dec512d8b.
        hints["named"] = CONFIGS.get(re.sub(r"_dec\d+d\d+b$", "", args["model"]))
    config = _infer_config(raw, raw.state, has_decoder=_has_decoder_keys(raw.state), eps=1e-6, hints=hints)
    return _build(raw, raw.state, config, "mae-official")


# ---------------------------------------------------------------------------------------------- vit-pytorch
def _detect_vit_pytorch(raw: RawCheckpoint) -> LoadedModel | None:
    """lucidrains vit-pytorch MAE (or its ViT encoder) + a sidecar config; see model/vit_pytorch_mae.py."""
    from model.vit_pytorch_mae import is_vit_pytorch_state, load_vit_pytorch

    if raw.config_json is not None or not is_vit_pytorch_state(raw.state):
        return None
    return load_vit_pytorch(raw.weights_file, raw.state)


# Tried in order; the first that recognises the layout wins. Add a family here (one line).
DETECTORS: list[Detector] = [_detect_own, _detect_hf, _detect_timm, _detect_vit_pytorch, _detect_official]


# ---------------------------------------------------------------------------------------------- config
def _has_decoder_keys(state: Iterable[str]) -> bool:
    return any(k.startswith("decoder_") or k == "mask_token" for k in state)


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _first_dim(state: Mapping[str, torch.Tensor], *keys_dims: tuple[str, int]) -> int | None:
    """The size of the first of these (key, dim) that the file has."""
    for key, dim in keys_dims:
        if key in state and state[key].ndim:
            return int(state[key].shape[dim])
    return None


def _heads(width: int, table: Mapping[int, int], option: str, raw: RawCheckpoint) -> int:
    if width in table:
        return table[width]
    if width % FALLBACK_HEAD_DIM == 0:
        return width // FALLBACK_HEAD_DIM
    raise raw.fail(
        f"cannot infer the heads of a {width}-d stack (not in the paper's table, not a multiple of "
        f"{FALLBACK_HEAD_DIM}); pass {option}= explicitly"
    )


def _infer_config(
    raw: RawCheckpoint,
    state: Mapping[str, torch.Tensor],
    *,
    has_decoder: bool,
    eps: float,
    name: str | None = None,
    hints: Mapping[str, Any] | None = None,
) -> MAEConfig:
    """An MAEConfig from tensor shapes (official key names); heads as the module docstring says."""
    hints = dict(hints or {})
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise raw.fail("missing patch_embed.proj.weight (D, C, p, p): cannot infer the model's shape")
    embed_dim, in_chans, p, p2 = (int(s) for s in proj.shape)
    if p != p2:
        raise raw.fail(f"non-square patches {p}x{p2} are not supported")
    depth = _depth(state, "blocks")
    if depth == 0:
        raise raw.fail("no encoder blocks (blocks.N.*) in the file")
    hidden = _first_dim(state, ("blocks.0.mlp.fc1.weight", 0))
    values: dict[str, Any] = dict(
        patch_size=p,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        mlp_ratio=hidden / embed_dim if hidden else 4.0,
        layer_norm_eps=eps,
        has_decoder=has_decoder,
        norm_pix_loss=bool(hints.get("norm_pix_loss", False)),
        name=name,
    )
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        side = math.isqrt(int(pos.shape[1]) - 1)
        if side * side != pos.shape[1] - 1:
            raise raw.fail(f"pos_embed of {pos.shape[1] - 1} patches (+ CLS) is not a square grid")
        values["img_size"] = side * p
    elif "img_size" in hints:
        values["img_size"] = int(hints["img_size"])
    else:
        raise raw.fail("no pos_embed and no image size recorded: cannot infer the input size")
    if has_decoder:
        dec_dim = _first_dim(
            state,
            ("decoder_embed.weight", 0),
            ("mask_token", -1),
            ("decoder_norm.weight", 0),
            ("decoder_pred.weight", 1),
        )
        if dec_dim is None:
            raise raw.fail("has decoder keys but none that gives the decoder width (decoder_embed.weight)")
        values.update(decoder_embed_dim=dec_dim, decoder_depth=_depth(state, "decoder_blocks"))
        if values["decoder_depth"] == 0:
            raise raw.fail("has decoder keys but no decoder blocks (decoder_blocks.N.*)")
        dec_hidden = _first_dim(state, ("decoder_blocks.0.mlp.fc1.weight", 0))
        if dec_hidden and not math.isclose(dec_hidden / dec_dim, values["mlp_ratio"]):
            raise raw.fail(
                f"encoder MLP ratio {values['mlp_ratio']:g} differs from the decoder's {dec_hidden / dec_dim:g}"
            )
    for k in ("pixel_mean", "pixel_std"):
        if k in hints:
            values[k] = hints[k]

    # Heads: override > the checkpoint's own word > a named config with the same shapes > paper > head_dim 64.
    shape_keys = ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio"]
    if has_decoder:
        shape_keys += ["decoder_embed_dim", "decoder_depth"]
    named = hints.get("named")
    if named is None or any(getattr(named, k) != values[k] for k in shape_keys if k != "img_size"):
        named = next((c for c in CONFIGS.values() if all(getattr(c, k) == values[k] for k in shape_keys)), None)
    values["name"] = name or (named.name if named else raw.path.stem)
    hints = {**hints, **raw.overrides}
    values["num_heads"] = int(
        hints.get("num_heads") or (named.num_heads if named else _heads(embed_dim, PAPER_HEADS, "num_heads", raw))
    )
    if has_decoder:
        dec_dim = values["decoder_embed_dim"]
        values["decoder_num_heads"] = int(
            hints.get("decoder_num_heads")
            or (named.decoder_num_heads if named else _heads(dec_dim, PAPER_DECODER_HEADS, "decoder_num_heads", raw))
        )
    return _make_config(raw, values)


def _make_config(raw: RawCheckpoint, values: dict[str, Any]) -> MAEConfig:
    values = {**values, **raw.overrides}
    if not values.get("has_decoder", True):
        # Decoder fields mean nothing here; keep the defaults so the config validates.
        for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            values.pop(k, None)
    try:
        return MAEConfig(**values)
    except (TypeError, ValueError) as e:
        raise raw.fail(f"inconsistent model config: {e}") from None


def _apply_overrides(raw: RawCheckpoint, config: MAEConfig) -> MAEConfig:
    return _make_config(raw, {f.name: getattr(config, f.name) for f in fields(MAEConfig)})


# ---------------------------------------------------------------------------------------------- building
def _first(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _build(
    raw: RawCheckpoint,
    state: Mapping[str, torch.Tensor],
    config: MAEConfig,
    fmt: str,
    notes: Iterable[str] = (),
) -> LoadedModel:
    """Check `state` (official key names) against MAE(config) key by key, then load it in fp32."""
    notes = list(notes)
    model = MAE(config)
    expected = model.state_dict()
    state = dict(state)
    for table in FIXED_TABLES:
        if table in expected and table not in state:
            state[table] = expected[table]
            notes.append(f"{table} absent from the file: using the 2-D sin-cos table")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        dec = [k for k in missing if _has_decoder_keys([k])]
        enc = [k for k in missing if k not in dec]
        parts = [f"{len(enc)} encoder keys ({_first(enc)})"] if enc else []
        parts += [f"{len(dec)} decoder keys ({_first(dec)})"] if dec else []
        raise raw.fail("missing " + " and ".join(parts))
    if unexpected:
        hint = " (decoder keys in an encoder-only config)" if _has_decoder_keys(unexpected) else ""
        raise raw.fail(f"{len(unexpected)} unexpected keys ({_first(unexpected)}){hint}")
    bad_shapes = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad_shapes:
        k = bad_shapes[0]
        more = f" (and {len(bad_shapes) - 1} more)" if len(bad_shapes) > 1 else ""
        raise raw.fail(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}{more}")
    converted = {}
    for k, v in state.items():
        if not v.is_floating_point():
            raise raw.fail(f"{k} has dtype {v.dtype}; expected floating-point weights")
        v = v.detach().to("cpu", torch.float32)
        if not torch.isfinite(v).all():
            raise raw.fail(f"{k} contains NaN or inf")
        converted[k] = v
    for table in FIXED_TABLES:
        if table in expected:
            diff = float((converted[table] - expected[table]).abs().max())
            if diff > 1e-3:  # beyond fp16 rounding of values in [-1, 1]
                notes.append(f"{table} differs from the 2-D sin-cos table (max |diff| {diff:.3g}); using the file's")
    model.load_state_dict(converted, assign=True)  # no second copy of the weights in memory
    return raw.loaded(model, fmt, notes)


# ---------------------------------------------------------------------------------------------- reading
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


def _torch_load(path: Path) -> Any:
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
        raise CheckpointError(f"{path}: not a state dict: {len(bad)} entries are not named tensors ({_first(bad)})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(state dict, safetensors metadata, other entries of a .pth wrapper)."""
    if _sniff(path) == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None
        return _tensor_dict(state, path), metadata, {}
    obj = _torch_load(path)
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
        weights = next((p / w for w in _WEIGHT_FILES if (p / w).is_file()), None)
        if not config_path.is_file() or weights is None:
            sharded = any(p.glob("*.index.json"))
            why = (
                "sharded checkpoints are not supported"
                if sharded
                else "expected config.json with " + " or ".join(_WEIGHT_FILES)
            )
            raise CheckpointError(f"{p}: unknown directory layout: {why} (a Hugging Face ViTMAE or timm directory)")
        state, metadata, extra = _read_file(weights)
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
    state, metadata, extra = _read_file(p)
    return RawCheckpoint(p, p, state, metadata, None, extra, None, overrides)


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
    raise raw.fail(f"unrecognised checkpoint layout ({len(raw.state)} tensors: {_first(sorted(raw.state))})")


__all__ = [
    "DETECTORS",
    "FORMAT_TAG",
    "CheckpointError",
    "Detector",
    "LoadedModel",
    "RawCheckpoint",
    "hf_to_official",
    "load",
    "load_own",
    "read_checkpoint",
    "save",
    "sha256_of",
]
