"""Hugging Face ViTMAE: a ViTMAEForPreTraining / ViTMAEModel directory (config.json + model.safetensors or
pytorch_model.bin), or a bare state dict in that layout.

Both the hub's legacy key names (``vit.encoder.layer.N.attention.attention.query``, ``decoder.decoder_layers.N``) and
transformers 5.x names (``layers.N.attention.q_proj``, and the ``decoder.decoder_encoder.layer.N`` that 5.x's
save_pretrained writes) are read; q, k, v become one qkv.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from model.formats.mae_state import build, has_decoder_keys, infer_config, make_config
from model.formats.reading import LoadedModel, RawCheckpoint, first

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
        if m is None or target is None:
            unknown.append(key)
            continue
        block = f"{'decoder_blocks' if key.startswith('decoder.') else 'blocks'}.{m.group(1)}"
        if target in ("q", "k", "v"):
            qkv.setdefault((block, m.group(3)), {})[target] = value
        else:
            out[f"{block}.{target}.{m.group(3)}"] = value
    if unknown:
        raise raw.fail(f"{len(unknown)} keys unknown to the ViTMAE layout ({first(unknown)})")
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


def detect(raw: RawCheckpoint) -> LoadedModel | None:
    cj = raw.config_json
    claims = cj is not None and cj.get("model_type") == "vit_mae"
    if not claims and not (cj is None and _is_hf_layout(raw.state)):
        return None
    if not _is_hf_layout(raw.state):
        raise raw.fail("config.json says vit_mae but the weights are not in the ViTMAE layout")
    state = hf_to_official(raw.state, raw)
    if cj is None:  # a bare HF state dict: shapes, and HF's default eps
        has_decoder = has_decoder_keys(state)
        config = infer_config(raw, state, has_decoder=has_decoder, eps=1e-12)
        return build(raw, state, config, "hf-vitmae")
    if cj.get("hidden_act", "gelu") != "gelu":
        raise raw.fail(f"hidden_act {cj['hidden_act']!r} is not supported (the MAE uses exact gelu)")
    if not cj.get("qkv_bias", True):
        raise raw.fail("qkv_bias=false is not supported (the MAE's attention has a qkv bias)")
    hidden, dec_hidden = int(cj.get("hidden_size", 768)), int(cj.get("decoder_hidden_size", 512))
    ratio = int(cj.get("intermediate_size", 3072)) / hidden
    dec_ratio = int(cj.get("decoder_intermediate_size", 2048)) / dec_hidden
    # A ViTMAEForPreTraining file claims a decoder; ViTMAEModel files have none.
    has_decoder = has_decoder_keys(state) or "ViTMAEForPreTraining" in (cj.get("architectures") or [])
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
    return build(raw, state, make_config(raw, values), "hf-vitmae")
