"""timm: a VisionTransformer ``.mae`` encoder (a directory with timm's config.json, or a bare file that carries timm's
``head``/``fc_norm`` keys). Encoder only: it embeds, it cannot reconstruct.
"""

from __future__ import annotations

from typing import Any

from model.formats.mae_state import build, has_decoder_keys, infer_config
from model.formats.reading import LoadedModel, RawCheckpoint

# timm ViT names -> heads, for timm directories whose config.json has no model_args.
TIMM_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_huge": 16, "vit_giant": 16}


def detect(raw: RawCheckpoint) -> LoadedModel | None:
    cj = raw.config_json
    timm_keys = [k for k in raw.state if k.split(".")[0] in ("head", "fc_norm")]
    bare_timm = cj is None and timm_keys and "cls_token" in raw.state and not has_decoder_keys(raw.state)
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
    if has_decoder_keys(state):
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
    config = infer_config(raw, state, has_decoder=False, eps=1e-6, name=name, hints=hints)
    return build(raw, state, config, "timm", notes)
