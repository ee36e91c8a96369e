"""MAE pre-training on an image folder, as in the paper (Sec. 4 / appendix A.1), sized for small machines.

    python -m model.train --data data/photos/train --config mae_vit_demo_patch16 --steps 4500 --threads 1 \
        --cache-side 768 --resume --out runs/demo      # `make demo-model` runs the bundled model's recipe

RandomResizedCrop(scale 0.2-1) + flip, AdamW (betas 0.9/0.95, wd 0.05 on weights only), linear warm-up then
cosine decay, 75% masking. fp32 on CPU, bf16 autocast on GPU. Resumable: rerun the same command with --resume
(a killed run loses only the steps since its last checkpoint). Writes loss.csv (step, lr, loss per step),
loss.png, checkpoint.pt (to resume), model.safetensors (the project's format), starts.jsonl (each start or
resume with its arguments) and, with --snapshot-every, snapshots/step_N.safetensors.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import get_config
from model.data import ImageFolderInMemory
from model.formats import save
from model.mae import MAE
from model.masking import Masking, len_keep_for_ratio, random_noise


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up to `peak`, then half-cycle cosine down to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_overrides(items: list[str]) -> dict[str, int | float | str]:
    """["embed_dim=256", "mlp_ratio=4.0"] -> {"embed_dim": 256, "mlp_ratio": 4.0} (ints, floats, else strings)."""
    out: dict[str, int | float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def truncate_log(csv_path: Path, step: int) -> None:
    """Keep the header and the rows of steps <= `step` (the checkpoint a resumed run starts from)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and tokens (1-D or token parameters), as timm/official do."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def plot_loss(csv_path: Path, png_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: install the `train` extra
        return
    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    k = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
    ax.plot(steps, smooth, lw=1.5, label=f"moving mean ({k + 1})")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (normalised pixels)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="image folder (searched recursively)")
    ap.add_argument("--config", default="mae_vit_demo_patch16", help="a named config from model/config.py")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set embed_dim=256 --set depth=8 (repeatable)",
    )
    ap.add_argument("--name", default=None, help="config name stored in the weights (default: --config's)")
    ap.add_argument("--cache-side", type=int, default=512, help="photos kept in memory at this long side (px)")
    ap.add_argument("--norm-pix-loss", action="store_true", help="standardised-patch targets (off for a demo model)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=10000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="images per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=2.5e-3, help="peak learning rate")
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument(
        "--exit-after-step",
        type=int,
        default=None,
        help="stop after this step without saving, as a killed process would (tests; running in chunks)",
    )
    ap.add_argument("--fp16-weights", action="store_true", help="store model.safetensors in fp16 (half the size)")
    ap.add_argument(
        "--snapshot-every", type=int, default=0, help="also keep OUT/snapshots/step_N.safetensors every N steps"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = get_config(args.config).replace(norm_pix_loss=args.norm_pix_loss, **parse_overrides(args.set))
    if args.name:
        config = config.replace(name=args.name)

    torch.manual_seed(args.seed)  # only the initial weights; every later draw uses `g`
    model = MAE(config).to(device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        g.set_state(ckpt["generator"])
        start = int(ckpt["step"])
        print(f"resumed at step {start}")
    data = ImageFolderInMemory(args.data, config.img_size, cache_side=args.cache_side)
    run_args = vars(args) | {"config_dict": config.to_dict(), "start_step": start, "num_images": len(data)}
    if start == 0:
        (out / "args.json").write_text(json.dumps(run_args, indent=2))
    with open(out / "starts.jsonl", "a") as f:  # every start and resume, with the schedule it ran under
        f.write(json.dumps(run_args | {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    csv_path = out / "loss.csv"
    new_csv = start == 0 or not csv_path.exists()
    if not new_csv:
        truncate_log(csv_path, start)  # rows after the checkpoint were lost with the process; they will be redone
    log = open(csv_path, "w" if new_csv else "a", newline="")  # noqa: SIM115 (open for the whole run)
    writer = csv.writer(log)
    if new_csv:
        writer.writerow(["step", "lr", "loss", "images_per_s", "elapsed_s"])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    len_keep = len_keep_for_ratio(config.num_patches, args.mask_ratio)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pre-training", unit="step")

    def checkpoint(step: int) -> None:
        log.flush()  # the log first: a resume keeps rows up to the checkpoint's step, so they must be on disk
        # Write then rename: a process killed mid-save leaves the previous checkpoint intact.
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(), "step": step},
            tmp,
        )
        tmp.replace(ckpt_path)
        tmp_weights = out / "model.safetensors.tmp"
        save(model, tmp_weights, dtype=torch.float16 if args.fp16_weights else None)
        tmp_weights.replace(out / "model.safetensors")
        if args.snapshot_every and step % args.snapshot_every == 0:
            (out / "snapshots").mkdir(exist_ok=True)
            shutil.copyfile(out / "model.safetensors", out / "snapshots" / f"step_{step}.safetensors")
        plot_loss(csv_path, out / "loss.png")

    for step in bar:
        t = time.perf_counter()
        lr = lr_at(step, peak=args.lr, warmup=args.warmup, total=args.steps, floor=args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(args.accum):
            imgs = model.normalize(data.batch(args.batch_size, g).to(device, non_blocking=True))
            masking = Masking(random_noise(args.batch_size, config.num_patches, generator=g), len_keep)
            with autocast:
                loss = model.loss(imgs, masking) / args.accum
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            raise SystemExit(f"loss is {total} at step {step}; stopping")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ips = args.batch_size * args.accum / (time.perf_counter() - t)
        writer.writerow([step + 1, f"{lr:.6g}", f"{total:.5f}", f"{ips:.1f}", f"{time.perf_counter() - t0:.1f}"])
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
        if args.exit_after_step is not None and step + 1 >= args.exit_after_step:
            log.close()
            print(f"exiting after step {step + 1} (--exit-after-step); resume with --resume")
            return
    log.close()
    print(f"done: {args.steps} steps, {time.perf_counter() - t0:.0f} s, weights in {out / 'model.safetensors'}")


if __name__ == "__main__":
    main()
