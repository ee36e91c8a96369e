"""model.evaluate: the baselines on inputs whose answer is known, the metric, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import einops
import pytest
import torch
from PIL import Image

from model import MAE, ReconstructBatch
from model.config import get_config
from model.evaluate import (
    METHODS,
    PSNR_CAP_DB,
    bilinear_fill,
    evaluate,
    main,
    masked_mse,
    mean_fill,
    pixel_mask,
    psnr,
)
from model.formats import save
from model.masking import Masking, explicit_masking, random_masking_spec

pytestmark = pytest.mark.unit

P = 8  # mae_test: 32 x 32 images, 8 x 8 patches, a 4 x 4 grid
SIZE = 32


def ramp(fx: float, fy: float) -> torch.Tensor:
    """(1, 3, 32, 32) image linear in x and y, inside [0, 1]."""
    y, x = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    return torch.stack([0.1 + fx * x + fy * y, 0.8 - fx * x + 0.5 * fy * y, 0.3 + 0.5 * fx * x - fy * y])[None]


# ---------------------------------------------------------------------------------------------------- metric
def test_psnr_values_and_cap() -> None:
    assert psnr(1.0) == 0.0
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.0) == PSNR_CAP_DB == pytest.approx(100.0)  # perfect: capped, not inf
    assert psnr(1e-30) == PSNR_CAP_DB


def test_masked_mse_is_reconstruct_output_mse() -> None:
    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    imgs = torch.rand(3, 3, SIZE, SIZE)
    out = model.reconstruct(imgs, random_masking_spec(16, 0.75, seed=1, batch=3))
    torch.testing.assert_close(masked_mse(out.reconstruction, imgs, out.mask, P), out.mse)
    # Only masked patches count: corrupting a visible patch changes nothing.
    other = out.reconstruction.clone()
    other[pixel_mask(1 - out.mask, out.grid, P).expand_as(other) > 0.5] = 0.0
    torch.testing.assert_close(masked_mse(other, imgs, out.mask, P), out.mse)


# ---------------------------------------------------------------------------------------------------- mean fill
def test_mean_fill_exact_on_constant_images() -> None:
    imgs = torch.stack([torch.full((3, SIZE, SIZE), v) for v in (0.2, 0.7)])
    imgs[1, 0] = 0.1  # per-channel colour
    mask = random_masking_spec(16, 0.75, seed=3, batch=2).mask()
    filled = mean_fill(imgs, mask, P)
    torch.testing.assert_close(filled, imgs)
    assert psnr(masked_mse(filled, imgs, mask, P).max().item()) == PSNR_CAP_DB


def test_mean_fill_uses_visible_pixels_of_its_own_image_only() -> None:
    imgs = torch.rand(2, 3, SIZE, SIZE)
    mask = explicit_masking([0, 5, 6, 15], 16).mask().expand(2, -1)
    filled = mean_fill(imgs, mask, P)
    visible = pixel_mask(mask, (4, 4), P)[:, 0] < 0.5
    for i in range(2):
        want = imgs[i][:, visible[i]].mean(dim=1)
        torch.testing.assert_close(filled[i, :, 0, 0], want)  # patch 0 is masked
        torch.testing.assert_close(filled[i, :, visible[i]], imgs[i][:, visible[i]])


# ---------------------------------------------------------------------------------------------------- bilinear
def test_bilinear_hand_computed_row() -> None:
    # patch size 1: five pixels in a row, the middle three masked -> evenly spaced between 0 and 1.
    img = torch.tensor([0.0, 9.0, 9.0, 9.0, 1.0]).view(1, 1, 1, 5)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(bilinear_fill(img, mask, 1)[0, 0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_bilinear_weights_rows_and_columns_by_span() -> None:
    # 3 x 5 image, only the centre pixel masked: row neighbours 1 apart each side (span 2),
    # column neighbours too (span 2) -> equal weights: the mean of the row and column interpolations.
    img = torch.zeros(1, 1, 3, 5)
    img[0, 0, 1, 1], img[0, 0, 1, 3] = 0.2, 0.4  # row estimate 0.3
    img[0, 0, 0, 2], img[0, 0, 2, 2] = 0.8, 1.0  # column estimate 0.9
    mask = torch.zeros(1, 15)
    mask[0, 7] = 1
    assert bilinear_fill(img, mask, 1)[0, 0, 1, 2].item() == pytest.approx(0.6)
    # Now the row bracket is 4 wide (span 4, weight 1/4) against the column's 2 (weight 1/2).
    mask[0, [6, 8]] = 1
    img[0, 0, 1, 0], img[0, 0, 1, 4] = 0.1, 0.5  # row estimate 0.3 again
    assert bilinear_fill(img, mask, 1)[0, 0, 1, 2].item() == pytest.approx((0.3 / 4 + 0.9 / 2) / (1 / 4 + 1 / 2))


def test_bilinear_exact_on_linear_ramp_when_bracketed() -> None:
    img = ramp(0.012, 0.009)
    assert img.min() >= 0.0 and img.max() <= 1.0
    cases = {
        "interior 2x2 block (rows and columns)": [5, 6, 9, 10],
        "two middle patch columns (rows only)": [1, 2, 5, 6, 9, 10, 13, 14],
        "two middle patch rows (columns only)": [4, 5, 6, 7, 8, 9, 10, 11],
    }
    for what, masked in cases.items():
        mask = explicit_masking(masked, 16).mask()
        filled = bilinear_fill(img, mask, P)
        torch.testing.assert_close(filled, img, atol=1e-6, rtol=0, msg=what)
        assert psnr(masked_mse(filled, img, mask, P).item()) > 100 - 1e-6, what
    # ... and the mean fill is not (the test can tell the two apart).
    mask = explicit_masking([5, 6, 9, 10], 16).mask()
    assert masked_mse(mean_fill(img, mask, P), img, mask, P).item() > 1e-3


def test_bilinear_border_and_fallbacks() -> None:
    torch.manual_seed(0)
    img = torch.rand(1, 3, SIZE, SIZE)
    mask = explicit_masking(list(range(1, 16)), 16).mask()  # only the top-left patch is visible
    filled = bilinear_fill(img, mask, P)
    assert torch.isfinite(filled).all() and filled.min() >= 0.0 and filled.max() <= 1.0
    torch.testing.assert_close(filled[..., :P, :P], img[..., :P, :P])  # visible pixels untouched
    # Patch 1 (right of it): no column data, only a left neighbour -> that pixel's value, constant along the row.
    torch.testing.assert_close(filled[0, :, :P, P : 2 * P], img[0, :, :P, P - 1 : P].expand(3, P, P))
    # Patch 15: nothing in its rows or columns -> the mean visible colour.
    mean = img[0, :, :P, :P].mean(dim=(1, 2))
    torch.testing.assert_close(filled[0, :, -P:, -P:], mean[:, None, None].expand(3, P, P))


def test_bilinear_beats_mean_fill_on_smooth_images() -> None:
    torch.manual_seed(1)
    # Smooth random images: upsampled noise.
    imgs = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=SIZE, mode="bicubic").clamp(0, 1)
    mask = random_masking_spec(16, 0.5, seed=0, batch=4).mask()
    assert (
        masked_mse(bilinear_fill(imgs, mask, P), imgs, mask, P).mean()
        < masked_mse(mean_fill(imgs, mask, P), imgs, mask, P).mean()
    )


# ---------------------------------------------------------------------------------------------------- evaluate
class PerfectModel:
    """Reconstructs every patch exactly: the headline must hit the cap, not inf/NaN."""

    def __init__(self) -> None:
        self.config = get_config("mae_test")

    def eval(self) -> PerfectModel:
        return self

    def reconstruct(self, images: torch.Tensor, masking: Masking) -> ReconstructBatch:
        mask = masking.mask()
        pixels = einops.rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=P, q=P)  # every patch exact
        zeros = torch.zeros(images.shape[0])
        return ReconstructBatch(
            pred=torch.zeros(0), mask=mask, pixels=pixels, images=images,
            patch_error=torch.zeros_like(mask), mse=zeros, grid=(4, 4),
        )  # fmt: skip


def test_perfect_model_scores_the_cap() -> None:
    imgs = torch.rand(3, 3, SIZE, SIZE)
    report, columns = evaluate(PerfectModel(), imgs, ["a", "b", "c"], seeds=[0, 1], keep_for_picture=2)
    assert report["overall"]["mae"]["mean_psnr"] == PSNR_CAP_DB
    assert report["overall"]["mae"]["psnr_of_mean_mse"] == PSNR_CAP_DB
    assert report["model_vs_baselines"]["bilinear"]["win_rate"] == 1.0
    assert all(math.isfinite(v["mean_psnr"]) for v in report["overall"].values())
    assert set(columns) == {"original", "masked", "reconstruction", "paste", "mean fill", "bilinear"}
    assert all(v.shape == (2, 3, SIZE, SIZE) for v in columns.values())


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    weights = root / "tiny.safetensors"
    save(MAE(get_config("mae_test")), weights)
    data = root / "images"
    (data / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 30), (32, 32), (64, 48), (20, 50), (33, 33)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).byte().numpy()
        folder = data / "sub" if i % 2 else data
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return weights, data


def run_cli(tiny_setup: tuple[Path, Path], out: Path, seeds: list[str]) -> dict:
    weights, data = tiny_setup
    main(["--weights", str(weights), "--data", str(data), "--seeds", *seeds, "--out", str(out), "--rows", "3"])
    return json.loads((out / "metrics.json").read_text())


def test_cli_writes_json_markdown_and_picture(tiny_setup: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    report = run_cli(tiny_setup, tmp_path / "a", ["0", "1"])
    printed = capsys.readouterr().out
    assert "| mae |" in printed and "| bilinear |" in printed and "wrote picture" in printed
    for key in ("weights", "weights_sha256", "architecture", "mask_ratio", "seeds", "num_images", "headline",
                "psnr_cap_db", "overall", "model_vs_baselines", "images", "num_masked"):  # fmt: skip
        assert key in report, key
    assert report["num_images"] == 5 and report["seeds"] == [0, 1] and report["headline"] == "mean_psnr"
    assert report["num_masked"] == 12 and report["architecture"] == "mae_test"
    assert {r["file"] for r in report["images"]} == {"img0.png", "sub/img1.png", "img2.png", "sub/img3.png", "img4.png"}
    for r in report["images"]:
        assert set(r["psnr"]) == set(METHODS) and all(len(v) == 2 for v in r["mse_per_seed"].values())
    for m in METHODS:
        o = report["overall"][m]
        assert o["mean_psnr"] == pytest.approx(sum(r["psnr"][m] for r in report["images"]) / 5)
        assert o["psnr_of_mean_mse"] == pytest.approx(psnr(sum(r["mse"][m] for r in report["images"]) / 5))
        assert o["min_psnr"] <= o["mean_psnr"] <= o["max_psnr"]
    md = (tmp_path / "a" / "metrics.md").read_text()
    assert "mean PSNR (dB, headline)" in md and "sub/img3.png" in md
    with Image.open(tmp_path / "a" / "samples.png") as im:
        assert im.mode == "RGB"
        w, h = im.size
        assert w >= 6 * 128 and h >= 3 * 128  # six columns, three rows of >= 128 px tiles


def test_cli_same_seeds_same_numbers(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    a = run_cli(tiny_setup, tmp_path / "a", ["0", "1"])
    b = run_cli(tiny_setup, tmp_path / "b", ["0", "1"])
    c = run_cli(tiny_setup, tmp_path / "c", ["5", "6"])
    assert a["overall"] == b["overall"] and a["images"] == b["images"]
    assert a["overall"] != c["overall"]  # the seed does pick the mask


def test_cli_refuses_encoder_only_weights(tmp_path: Path, tiny_setup: tuple[Path, Path]) -> None:
    weights = tmp_path / "enc.safetensors"
    save(MAE(get_config("mae_test").replace(has_decoder=False)), weights)
    with pytest.raises(SystemExit, match="encoder-only"):
        main(["--weights", str(weights), "--data", str(tiny_setup[1])])
