"""The bundled demo model is the one the documents describe, and it is a trained model.

- Its sha256 is the one the README and the model card give, and the one every evaluation under weights/demo_eval/
  was run on: replacing the file without re-running them (and updating the card) fails here.
- On the page's three sample photos (held out from training: app/static/samples/CREDITS.md) it beats bilinear
  inpainting at 75 % masking (model.evaluate's protocol): a random or broken file does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from model.evaluate import evaluate, load_images
from model.formats import load

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "weights" / "mae_demo.safetensors"
HELD_OUT = ROOT / "app" / "static" / "samples"


def test_the_documents_name_the_bundled_file():
    digest = hashlib.sha256(BUNDLED.read_bytes()).hexdigest()
    assert digest in (ROOT / "README.md").read_text(), "README: the bundled weights' sha256"
    assert digest in (ROOT / "weights" / "MODEL_CARD.md").read_text(), "MODEL_CARD.md: the bundled weights' sha256"
    evals = sorted((ROOT / "weights" / "demo_eval").glob("*/metrics.json"))
    assert evals, "weights/demo_eval/<split>/metrics.json: the model card's figures"
    for path in evals:
        assert json.loads(path.read_text())["weights_sha256"] == digest, f"{path}: evaluated other weights"


def test_the_bundled_model_beats_bilinear_on_held_out_photos():
    model = load(BUNDLED).model
    names, images = load_images(HELD_OUT, model.config.img_size)
    report, _ = evaluate(model, images, names, mask_ratio=0.75, seeds=(0, 1, 2))
    versus = report["model_vs_baselines"]["bilinear"]
    assert len(names) == 3 and versus["delta_mean_psnr_db"] > 0.5 and versus["win_rate"] >= 0.8, versus
