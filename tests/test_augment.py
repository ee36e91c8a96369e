"""Random-resized crops and flips of the training sampler: the paper's ranges, in bounds, seeded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import ImageFolderInMemory, crop_box

pytestmark = pytest.mark.unit


def test_crop_boxes_cover_the_scale_and_aspect_ranges_inside_the_image() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = 300, 400
    fractions, aspects = [], []
    for _ in range(2000):
        top, left, ch, cw = crop_box(h, w, g, (0.2, 1.0))
        assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch > 0 and cw > 0
        fractions.append(ch * cw / (h * w))
        aspects.append(cw / ch)
    # rounding to whole pixels moves the area by well under 2% here
    assert min(fractions) >= 0.2 * 0.98 and max(fractions) <= 1.0
    assert min(fractions) < 0.22 and max(fractions) > 0.9  # both ends of the range are reached
    assert 0.2 < sorted(fractions)[len(fractions) // 2] < 0.7  # not all at one end
    assert min(aspects) >= 0.75 * 0.98 and max(aspects) <= 4 / 3 * 1.02
    log_aspects = [math.log(a) for a in aspects]
    assert sum(a < 0 for a in log_aspects) > 500 and sum(a > 0 for a in log_aspects) > 500  # both orientations


def test_crop_box_falls_back_to_a_centre_crop_for_extreme_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    top, left, ch, cw = crop_box(10, 1000, g, (0.9, 1.0))  # no 3/4..4/3 crop can cover 90% of a 1:100 strip
    assert (ch, cw) == (10, 13) and top == 0 and left == (1000 - 13) // 2


def test_crop_boxes_are_reproducible_from_the_generator() -> None:
    a = [crop_box(300, 400, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert crop_box(300, 400, torch.Generator().manual_seed(8)) != a[0]


@pytest.fixture
def gradient_folder(tmp_path: Path) -> Path:
    """Photos whose red channel rises left to right: a flipped view has it falling."""
    for i, (w, h) in enumerate([(320, 240), (200, 260), (900, 600)]):
        ramp = Image.linear_gradient("L").rotate(90, expand=True).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        red = ramp.resize((w, h))
        Image.merge("RGB", (red, Image.new("L", (w, h), 100), Image.new("L", (w, h), 30 * i))).save(
            tmp_path / f"p{i}.png"
        )
    return tmp_path


def test_batches_are_views_of_the_right_size_range_and_half_flipped(gradient_folder: Path) -> None:
    data = ImageFolderInMemory(gradient_folder, img_size=32, cache_side=512)
    assert max(max(im.shape[1:]) for im in data.images) == 512  # the 900 px photo was bounded in memory
    g = torch.Generator().manual_seed(0)
    batch = torch.cat([data.batch(64, g) for _ in range(4)])
    assert batch.shape == (256, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    red = batch[:, 0]
    slope = red[:, :, -4:].mean(dim=(1, 2)) - red[:, :, :4].mean(dim=(1, 2))
    flipped = (slope < 0).float().mean().item()
    assert 0.4 < flipped < 0.6
    assert (slope.abs() > 0.01).all()  # every view spans part of the ramp: no empty or constant crops
    # different crops of the same photo: the views are not all alike
    assert batch[:, 0].mean(dim=(1, 2)).std() > 0.05


def test_batches_are_reproducible(gradient_folder: Path) -> None:
    data = ImageFolderInMemory(gradient_folder, img_size=32)
    a = data.batch(8, torch.Generator().manual_seed(3))
    b = data.batch(8, torch.Generator().manual_seed(3))
    c = data.batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
