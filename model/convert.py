"""Convert any checkpoint `model.formats.load` reads into the project's own format.

    python -m model.convert SRC DST [--fp16] [--num-heads N] [--decoder-num-heads N] [--norm-pix-loss {0,1}]

SRC: an official facebookresearch/mae .pth, a Hugging Face ViTMAE or timm directory, a bare state dict, or a
file in the project's format. Prints the detected format, the config and the sha256 of source and output.
The output is re-loaded before exit, so a file that this prints as written also loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from model.config import MAEConfig
from model.formats import CheckpointError, LoadedModel, load, save
from model.mae import MAE


def describe(config: MAEConfig) -> str:
    enc = (
        f"{config.name}: {config.img_size}px, patch {config.patch_size}, encoder {config.embed_dim}-d x "
        f"{config.depth} ({config.num_heads} heads), mlp ratio {config.mlp_ratio:g}, eps {config.layer_norm_eps:g}"
    )
    if not config.has_decoder:
        return enc + "; encoder only (no decoder)"
    return (
        enc + f"; decoder {config.decoder_embed_dim}-d x {config.decoder_depth} ({config.decoder_num_heads} heads), "
        f"norm_pix_loss={config.norm_pix_loss}"
    )


def convert(src: str | Path, dst: str | Path, *, fp16: bool = False, **overrides: Any) -> tuple[LoadedModel, str]:
    """Load `src` (any format), write `dst` in the project's format; returns the source and the output sha256."""
    source = load(src, **overrides)
    if Path(dst).resolve() == Path(src).resolve():
        raise CheckpointError(f"{dst}: refusing to overwrite the source")
    if not isinstance(source.model, MAE):
        raise CheckpointError(f"{src}: a {source.format} model has no mae-serve format; serve it as it is")
    extra = {"source_format": source.format, "source_sha256": source.sha256}
    digest = save(source.model, dst, dtype=torch.float16 if fp16 else None, extra=extra)
    load(dst)  # fails loudly here rather than at serving time
    return source, digest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mae-convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint file or directory (official .pth, HF ViTMAE, timm, bare, own)")
    ap.add_argument("dst", help="output .safetensors file")
    ap.add_argument("--fp16", action="store_true", help="store learned weights in fp16 (half the size)")
    ap.add_argument("--num-heads", type=int, help="encoder heads, where the file does not say")
    ap.add_argument("--decoder-num-heads", type=int, help="decoder heads, where the file does not say")
    ap.add_argument(
        "--norm-pix-loss", type=int, choices=(0, 1), help="override norm_pix_loss (official files without args)"
    )
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.decoder_num_heads is not None:
        overrides["decoder_num_heads"] = args.decoder_num_heads
    if args.norm_pix_loss is not None:
        overrides["norm_pix_loss"] = bool(args.norm_pix_loss)
    try:
        source, digest = convert(args.src, args.dst, fp16=args.fp16, **overrides)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"source: {source.path}")
    print(f"  format: {source.format}")
    print(f"  sha256: {source.sha256}")
    assert isinstance(source.config, MAEConfig)  # convert() takes the paper's MAE only
    print(f"  config: {describe(source.config)}")
    for note in source.notes:
        print(f"  note: {note}")
    print(f"output: {args.dst} ({'fp16' if args.fp16 else 'fp32'} weights, mae-serve)")
    print(f"  sha256: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
