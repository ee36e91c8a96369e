"""The fast paths of imaging and rendering (BENCHMARKS.md) give exactly the values of the stock paths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.serving import imaging, model_thread, render
from app.serving.registry import ModelEntry
from model import MAE, get_config
from model.masking import Masking, random_noise

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("shape", [(224, 224, 3), (1, 1, 3), (7, 33, 3)])
def test_png_encoder_round_trips(shape):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(render.encode_png(a)))
    assert im.format == "PNG" and im.mode == "RGB" and np.array_equal(np.asarray(im), a)
    view = np.random.default_rng(1).integers(0, 256, (3, 9, 5), dtype=np.uint8).transpose(1, 2, 0)  # not contiguous
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.encode_png(view)))), view)


def test_the_model_input_is_the_reference_preprocessing():
    """uint8 from Pillow's bicubic resize, then x / 255 in float32 where the model runs: what the official demo and
    Hugging Face's ViTImageProcessor (rescale 1/255) give."""
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    u8 = imaging.preprocess(im, 32)
    assert u8.dtype == np.uint8 and np.array_equal(u8, np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC)))
    x = model_thread.to_input(torch.from_numpy(np.stack([u8, u8])), torch.device("cpu"), torch.float32)
    ref = torch.from_numpy(u8.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous() and torch.equal(x[1], ref)


def test_uint8_views_equal_the_float_views_quantised():
    """render draws paste / masked / reconstruction from uint8 pixels and the uint8 input: exactly the float views of
    the model's output (ReconstructBatch), quantised."""
    from app.serving.pipeline import ReconstructAnswer
    from model.outputs import to_uint8

    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    entry = ModelEntry("t", model, "-", "random", "none", torch.device("cpu"), torch.float32)
    u8 = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = model_thread.to_input(torch.from_numpy(u8), torch.device("cpu"), torch.float32)
    masking = Masking(random_noise(2, 16, seed=4), 5)
    out = model.reconstruct(x, masking)
    for i, r in enumerate(out.unbatch()):
        rec = ReconstructAnswer.of(entry, u8[i], r, seed=4)
        for name, want in (("original", x), ("reconstruction", out.reconstruction), ("paste", out.paste),
                           ("masked", out.masked)):  # fmt: skip
            ref = to_uint8(want[i]).permute(1, 2, 0).numpy()
            assert np.array_equal(render.view(rec, name), ref), name


def test_jpeg_draft_decoding_keeps_both_sides_at_least_the_model_size():
    buf = io.BytesIO()
    Image.fromarray(np.full((700, 1000, 3), 128, np.uint8)).save(buf, format="JPEG")
    assert imaging.decode(buf.getvalue(), 10**8).size == (1000, 700)
    assert imaging.decode(buf.getvalue(), 10**8, min_side=224).size == (500, 350)  # 1/2: 1/4 would be < 224
