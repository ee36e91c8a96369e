"""A killed training run resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from model.train import main, parse_overrides

pytestmark = pytest.mark.unit


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.effect_noise((48 + 8 * i, 40), 30 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    return folder


def train(photos: Path, out: Path, *extra: str) -> None:
    main(
        ["--data", str(photos), "--config", "mae_test", "--out", str(out), "--steps", "6", "--batch-size", "4"]
        + ["--warmup", "2", "--save-every", "3", "--threads", "1", "--device", "cpu", "--set", "decoder_depth=2"]
        + list(extra)
    )


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kill_and_resume_equals_an_uninterrupted_run(photos: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(photos, straight, "--snapshot-every", "3")
    train(photos, killed, "--exit-after-step", "5")  # checkpoint at 3; steps 4 and 5 die with the process
    assert [r["step"] for r in rows(killed)] == ["1", "2", "3", "4", "5"]
    train(photos, killed, "--resume")

    assert [r["step"] for r in rows(killed)] == [str(s) for s in range(1, 7)]  # 4 and 5 redone, not doubled
    assert [(r["lr"], r["loss"]) for r in rows(killed)] == [(r["lr"], r["loss"]) for r in rows(straight)]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert sorted(p.name for p in (straight / "snapshots").iterdir()) == ["step_3.safetensors", "step_6.safetensors"]
    last = load_file(straight / "snapshots/step_6.safetensors")
    assert all((last[k] == a[k]).all() for k in a)
    starts = [json.loads(line) for line in (killed / "starts.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 3]
    assert json.loads((killed / "args.json").read_text())["config_dict"]["decoder_depth"] == 2
    assert not list(killed.glob("*.tmp"))  # checkpoints are written whole, then renamed


def test_lr_schedule_is_recorded_per_step(photos: Path, tmp_path: Path) -> None:
    train(photos, tmp_path / "run", "--lr", "1e-3", "--min-lr", "1e-5")
    lrs = [float(r["lr"]) for r in rows(tmp_path / "run")]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # linear warm-up over 2 steps
    assert lrs[2] == pytest.approx(1e-3) and lrs[2:] == sorted(lrs[2:], reverse=True)  # then cosine decay
    assert lrs[-1] < 3e-4


def test_overrides_parse_numbers_and_refuse_junk() -> None:
    assert parse_overrides(["embed_dim=256", "mlp_ratio=2.5", "name=x"]) == {
        "embed_dim": 256,
        "mlp_ratio": 2.5,
        "name": "x",
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["depth"])
