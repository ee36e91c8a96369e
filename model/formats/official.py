"""facebookresearch/mae: a ``.pth`` saved by misc.save_model (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``)
or a bare state dict in .pth/.safetensors, in the official key names (fused ``qkv``). Files without decoder keys
(``mae_pretrain_*``) load encoder-only.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from model.config import CONFIGS
from model.formats.mae_state import build, has_decoder_keys, infer_config
from model.formats.reading import LoadedModel, RawCheckpoint


def detect(raw: RawCheckpoint) -> LoadedModel | None:
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
    config = infer_config(raw, raw.state, has_decoder=has_decoder_keys(raw.state), eps=1e-6, hints=hints)
    return build(raw, raw.state, config, "mae-official")
