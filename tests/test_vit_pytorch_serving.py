"""A tutorial-built vit-pytorch MAE, saved with its sidecar, served through the HTTP API: equal to vit-pytorch."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.settings import Settings
from model.formats import load
from tests.serving import app_client
from tests.test_vit_pytorch import IMG, PATCH, L, images, make_reference, ref, run_reference, save, sidecar  # noqa: F401

pytestmark = pytest.mark.integration


def png(x01: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    a = (x01.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_vit_pytorch_checkpoint_serves_reconstructions_and_embeddings(ref, tmp_path, monkeypatch) -> None:  # noqa: F811
    mae = make_reference(ref, "cls")
    path = save(tmp_path, mae.state_dict(), sidecar("cls"))
    assert load(path).format == "vit-pytorch"  # found by format detection, not named
    data = png(images(1)[0])
    x01 = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255).permute(2, 0, 1)[None]

    masked = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 15]  # int(0.75 * 16) patches, as the reference masks
    assert len(masked) == int(0.75 * L)
    # The reference masks the patches with the smallest torch.rand draw: make those exactly ours.
    rand = torch.full((1, L), 0.5) + torch.arange(L) * 1e-3
    rand[0, masked] = torch.arange(len(masked)) * 1e-3

    with app_client(Settings(weights=str(path))) as c:
        info = c.get("/v1/models").json()["models"][0]
        assert info["family"] == "vit-pytorch" and info["patch_size"] == PATCH and info["image_size"] == IMG
        r = c.post(
            "/v1/reconstruct",
            params={"format": "json", "mask": ",".join(map(str, masked))},
            content=data,
            headers={"Content-Type": "image/png"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        emb = c.post("/v1/embed", content=data, headers={"Content-Type": "image/png"}).json()

    assert body["mask"] == masked
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"]["reconstruction"]))))
    model = load(path).model
    expect = run_reference(mae, model.normalize(x01), rand, monkeypatch)["all_pred"]
    recon = model.denormalize(model.unpatchify(expect)).clamp(0, 1)[0]
    expect_u8 = (recon * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(served.astype(int) - expect_u8.astype(int)).max() <= 1  # equal up to PNG's 8-bit rounding

    caught: dict[str, torch.Tensor] = {}
    hook = mae.encoder.transformer.register_forward_hook(lambda m, i, o: caught.__setitem__("out", o))
    with torch.no_grad():
        mae.encoder(model.normalize(x01))
    hook.remove()
    assert np.allclose(emb["cls"], caught["out"][0, 0].numpy(), atol=1e-5)
    assert np.allclose(emb["patches"], caught["out"][0, 1:].numpy(), atol=1e-5)
