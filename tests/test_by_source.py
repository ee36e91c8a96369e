"""mae-evaluate's per-source breakdown: grouping, the numbers per group, and the CLI output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.config import get_config
from model.evaluate import METHODS, evaluate, main, psnr
from model.formats import save
from model.mae import MAE
from photoset.by_source import per_source, picture_first, picture_rows, source_of

pytestmark = pytest.mark.unit


def test_source_is_the_first_folder_or_the_name_prefix() -> None:
    assert source_of("scikit-image/coffee.jpg") == "scikit-image"
    assert source_of("tuxpaint-data/sub/rocks.jpg") == "tuxpaint-data"
    assert source_of("mate-LadyBird.jpg") == "mate"
    assert source_of("lonely.jpg") == "(none)"


def row(file: str, mae: list[float], bilinear: list[float], mean_fill: list[float]) -> dict:
    per_seed = {"mae": mae, "bilinear": bilinear, "mean_fill": mean_fill}
    return {
        "file": file,
        "psnr": {m: psnr(sum(v) / len(v)) for m, v in per_seed.items()},
        "mse_per_seed": per_seed,
    }


def test_per_source_numbers_by_hand() -> None:
    rows = [
        row("a/1.jpg", [0.01, 0.01], [0.02, 0.005], [0.1, 0.1]),  # wins 1 of 2
        row("a/2.jpg", [0.001, 0.001], [0.01, 0.01], [0.1, 0.1]),  # wins 2 of 2
        row("b/3.jpg", [0.05, 0.05], [0.01, 0.01], [0.1, 0.1]),  # wins 0 of 2
    ]
    out = per_source(rows, METHODS)
    assert list(out) == ["a", "b"]
    a = out["a"]
    assert (a["num_images"], a["pairs"]) == (2, 4)
    assert a["win_rate_vs_bilinear"] == pytest.approx(3 / 4)
    want_mae = (psnr(0.01) + psnr(0.001)) / 2
    want_bil = (psnr(0.0125) + psnr(0.01)) / 2
    assert a["mean_psnr"]["mae"] == pytest.approx(want_mae)
    assert a["delta_vs_bilinear_db"] == pytest.approx(want_mae - want_bil)
    assert out["b"]["win_rate_vs_bilinear"] == 0.0 and out["b"]["delta_vs_bilinear_db"] < 0


def test_evaluate_report_groups_by_source_consistently_with_its_images() -> None:
    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    images = torch.rand(5, 3, 32, 32)
    images[3:] = images[3:].mean(dim=(2, 3), keepdim=True)  # flat photos: bilinear is exact there
    names = ["one/a.png", "one/b.png", "one/c.png", "two/d.png", "two/e.png"]
    report, _ = evaluate(model, images, names, seeds=(0, 1))
    by = report["by_source"]
    assert {k: v["num_images"] for k, v in by.items()} == {"one": 3, "two": 2}
    rows = {r["file"]: r for r in report["images"]}
    for source, files in {"one": names[:3], "two": names[3:]}.items():
        want = sum(rows[f]["psnr"]["mae"] for f in files) / len(files)
        assert by[source]["mean_psnr"]["mae"] == pytest.approx(want)
    assert by["two"]["win_rate_vs_bilinear"] == 0.0  # nothing beats an exact fill
    total = sum(v["win_rate_vs_bilinear"] * v["pairs"] for v in by.values()) / sum(v["pairs"] for v in by.values())
    assert total == pytest.approx(report["model_vs_baselines"]["bilinear"]["win_rate"])


def test_cli_prints_and_writes_the_per_source_table(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save(MAE(get_config("mae_test")), weights)
    data = tmp_path / "val"
    for source in ("alpha", "beta"):
        (data / source).mkdir(parents=True)
        for i in range(2):
            Image.effect_noise((40, 30), 40 + 20 * i).convert("RGB").save(data / source / f"{i}.png")
    main(["--weights", str(weights), "--data", str(data), "--seeds", "0", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "| source | images |" in printed and "| alpha | 2 |" in printed and "| beta | 2 |" in printed
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert set(metrics["by_source"]) == {"alpha", "beta"}
    assert "| alpha | 2 |" in (tmp_path / "out/metrics.md").read_text()


def test_picture_rows_take_the_first_of_every_source() -> None:
    names = ["a/1.jpg", "a/2.jpg", "a/3.jpg", "b/1.jpg", "c/1.jpg", "c/2.jpg"]
    assert picture_rows(names, 2) == [0, 1, 3, 4, 5]
    assert picture_first(names, 1) == [0, 3, 4, 1, 2, 5]
    assert sorted(picture_first(names, 1)) == list(range(len(names)))  # a reordering, nothing lost


def test_cli_picture_shows_every_source(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save(MAE(get_config("mae_test")), weights)
    data = tmp_path / "val"
    for source, n in (("alpha", 3), ("beta", 2)):
        (data / source).mkdir(parents=True)
        for i in range(n):
            Image.effect_noise((40, 30), 40 + 20 * i).convert("RGB").save(data / source / f"{i}.png")
    out = tmp_path / "out"
    main(["--weights", str(weights), "--data", str(data), "--seeds", "0", "--out", str(out), "--rows-per-source", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["file"] for r in metrics["images"]][:2] == ["alpha/0.png", "beta/0.png"]
    with Image.open(out / "samples.png") as pic:
        one_row = pic.height
    main(["--weights", str(weights), "--data", str(data), "--seeds", "0", "--out", str(out), "--rows", "1"])
    with Image.open(out / "samples.png") as pic:
        assert pic.height < one_row  # two rows (one per source) against one
