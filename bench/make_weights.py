"""Create the benchmark weights (idempotent): `python -m bench.make_weights`.

- bench/.weights/vit-mae-base-random: a randomly initialised ViT-B/16 `ViTMAEForPreTraining` (transformers'
  default config = the paper's ViT-B/16 with its 8 x 512 decoder), written with save_pretrained together with a
  ViTImageProcessor configured like facebook/vit-mae-base (224, bicubic, ImageNet mean/std). The baseline server
  loads it with transformers, mae-serve loads the same directory through model.formats' HF reader.
- bench/.weights/mae_demo_random.safetensors: a random-init `mae_vit_demo_patch16`, the cold-start stand-in
  until the trained weights/mae_demo.safetensors exists.
"""

from __future__ import annotations

import argparse

from bench.common import DEMO_RANDOM, NULL, SMALL, VITB_DIR


def make_vitb(force: bool = False) -> None:
    if (VITB_DIR / "config.json").exists() and not force:
        print(f"exists: {VITB_DIR}")
        return
    import torch
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    model = ViTMAEForPreTraining(ViTMAEConfig()).eval()  # the default config is facebook/vit-mae-base's
    model.save_pretrained(VITB_DIR)
    ViTImageProcessor(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=3,  # bicubic
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(VITB_DIR)
    print(f"wrote {VITB_DIR} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


def make_demo(force: bool = False) -> None:
    if DEMO_RANDOM.exists() and not force:
        print(f"exists: {DEMO_RANDOM}")
        return
    import torch

    from model import MAE, get_config
    from model.formats import save

    torch.manual_seed(0)
    DEMO_RANDOM.parent.mkdir(parents=True, exist_ok=True)
    save(MAE(get_config("mae_vit_demo_patch16")), DEMO_RANDOM)
    print(f"wrote {DEMO_RANDOM}")


def make_null_and_small(force: bool = False) -> None:
    """The host-path benchmark's models (bench/host_path.py): random weights, the paper's input and patch size."""
    import torch

    from model import MAE, get_config
    from model.formats import save

    base = get_config("mae_vit_base_patch16")
    shapes = {
        NULL: dict(name="null", embed_dim=16, depth=1, num_heads=1, decoder_embed_dim=16, decoder_depth=1,
                   decoder_num_heads=1),
        SMALL: dict(name="small", embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
                    decoder_num_heads=4),
    }  # fmt: skip
    for path, changes in shapes.items():
        if path.exists() and not force:
            print(f"exists: {path}")
            continue
        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save(MAE(base.replace(**changes)), path)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rewrite even if present")
    args = ap.parse_args(argv)
    make_vitb(args.force)
    make_demo(args.force)
    make_null_and_small(args.force)


if __name__ == "__main__":
    main()
