"""The paper's MAE from a state dict in the official key names: its config from the tensors' shapes, then the model.

Shared by the formats that map onto the official layout (own, official, Hugging Face, timm).

- Heads cannot be read from shapes. In order: an explicit override (``load(path, num_heads=...)``), the
  checkpoint's own config (HF config.json, timm model_args/architecture, official ``args.model``), a named
  config in `model.config.CONFIGS` whose every shape matches, the paper's table (768 -> 12, 1024 -> 16,
  1280 -> 16; decoder 512 -> 16), and last a head dimension of 64 (the paper's). Otherwise: an error asking
  for the override.
- Position tables (pos_embed, decoder_pos_embed) are loaded from the file into the buffers, as the official
  ``load_state_dict`` and transformers do, so a checkpoint behaves exactly as in its reference implementation.
  A table that is not the 2-D sin-cos table (beyond fp16 rounding) is kept and reported in
  `LoadedModel.notes`; a missing table is filled with the sin-cos table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch

from model.config import CONFIGS, MAEConfig
from model.formats.reading import LoadedModel, RawCheckpoint, first
from model.mae import MAE

# Fixed (not learned) tables: kept in fp32 by `own.save`, loaded from the file, checked against sin-cos.
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")
# Heads by width (paper, Table/Appendix A.1); the decoder of every released model is 512-d with 16 heads.
PAPER_HEADS = {768: 12, 1024: 16, 1280: 16}
PAPER_DECODER_HEADS = {512: 16}
FALLBACK_HEAD_DIM = 64


def has_decoder_keys(state: Iterable[str]) -> bool:
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


def infer_config(
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
    return make_config(raw, values)


def make_config(raw: RawCheckpoint, values: dict[str, Any]) -> MAEConfig:
    values = {**values, **raw.overrides}
    if not values.get("has_decoder", True):
        # Decoder fields mean nothing here; keep the defaults so the config validates.
        for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            values.pop(k, None)
    try:
        return MAEConfig(**values)
    except (TypeError, ValueError) as e:
        raise raw.fail(f"inconsistent model config: {e}") from None


def apply_overrides(raw: RawCheckpoint, config: MAEConfig) -> MAEConfig:
    return make_config(raw, {f.name: getattr(config, f.name) for f in fields(MAEConfig)})


def build(
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
        dec = [k for k in missing if has_decoder_keys([k])]
        enc = [k for k in missing if k not in dec]
        parts = [f"{len(enc)} encoder keys ({first(enc)})"] if enc else []
        parts += [f"{len(dec)} decoder keys ({first(dec)})"] if dec else []
        raise raw.fail("missing " + " and ".join(parts))
    if unexpected:
        hint = " (decoder keys in an encoder-only config)" if has_decoder_keys(unexpected) else ""
        raise raw.fail(f"{len(unexpected)} unexpected keys ({first(unexpected)}){hint}")
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
    return LoadedModel(model.eval(), model.config, str(raw.path), fmt, raw.sha256, tuple(notes))
