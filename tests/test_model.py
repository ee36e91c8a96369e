"""Unit tests of the MAE itself: patches, masking, loss, position tables, serving entry points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import MAE, DecoderMissingError
from model.config import get_config
from model.masking import Masking, explicit_masking, len_keep_for_ratio, no_masking, random_masking_spec
from model.pos_embed import sincos_2d

pytestmark = pytest.mark.unit

L = get_config("mae_test").num_patches  # 16 patches of 8x8 on a 32x32 image


def images(n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("hw", [(32, 32), (16, 40)])
def test_patchify_round_trip_and_official_order(make_mae, hw: tuple[int, int]) -> None:
    model = make_mae()
    x = images(2, *hw)
    p = model.config.patch_size
    patches = model.patchify(x)
    grid = (hw[0] // p, hw[1] // p)
    assert patches.shape == (2, grid[0] * grid[1], p * p * 3)
    assert torch.equal(model.unpatchify(patches, grid), x)
    # The official layout: raster order over patches, then rows, columns, channels within a patch.
    ref = x.reshape(2, 3, grid[0], p, grid[1], p).permute(0, 2, 4, 3, 5, 1).reshape(2, -1, p * p * 3)
    assert torch.equal(patches, ref)
    assert torch.equal(patches[0, 1].view(p, p, 3), x[0, :, :p, p : 2 * p].permute(1, 2, 0))


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masked_count_is_exact(make_mae, ratio: float) -> None:
    model = make_mae()
    masking = random_masking_spec(L, ratio, seed=3, batch=4)
    _, mask, _ = model.forward_encoder(model.normalize(images(4)), masking)
    expected = L - int(L * (1 - ratio))
    assert mask.sum(dim=1).tolist() == [expected] * 4
    assert masking.mask().sum(dim=1).tolist() == [expected] * 4


def test_masking_is_deterministic_under_a_seed_and_differs_across_seeds() -> None:
    a, b = random_masking_spec(L, 0.75, seed=7), random_masking_spec(L, 0.75, seed=7)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.mask(), b.mask())
    others = [random_masking_spec(L, 0.75, seed=s).mask() for s in range(8, 12)]
    assert any(not torch.equal(a.mask(), m) for m in others)


def test_explicit_masked_indices_are_honoured(make_mae) -> None:
    model = make_mae()
    hidden = [0, 5, 6, 15]
    masking = explicit_masking(hidden, L)
    assert masking.masked_indices() == [hidden]
    out = model.reconstruct(images(1), masking)
    assert torch.nonzero(out.mask[0]).flatten().tolist() == hidden
    enc = model.encode(images(1), masking)
    assert enc.patch_indices[0].tolist() == [i for i in range(L) if i not in hidden]


def test_each_image_in_a_batch_gets_its_own_mask(make_mae) -> None:
    model = make_mae()
    x = images(4)
    masking = random_masking_spec(L, 0.75, seed=1, batch=4)
    out = model.reconstruct(x, masking)
    rows = {tuple(r.tolist()) for r in out.mask}
    assert len(rows) == 4, "every image should draw its own mask"
    # And batching changes nothing: each image alone, with its own noise row, gives the same prediction.
    for i in range(4):
        alone = model.reconstruct(x[i : i + 1], Masking(masking.noise[i : i + 1], masking.len_keep))
        assert torch.equal(alone.mask[0], out.mask[i])
        torch.testing.assert_close(alone.pred[0], out.pred[i], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_counts_masked_patches_only(make_mae) -> None:
    model = make_mae()
    imgs = model.normalize(images(2))
    loss, pred, mask = model(imgs, random_masking_spec(L, 0.75, seed=2, batch=2))
    visible = (mask == 0)[..., None]
    changed_visible = pred + 100.0 * visible
    assert torch.equal(model.forward_loss(imgs, changed_visible, mask), loss)
    changed_masked = pred + 1.0 * (~visible)
    assert model.forward_loss(imgs, changed_masked, mask) > loss
    # The loss is the mean over masked patches of the per-patch MSE.
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())


def test_loss_is_finite_zero_at_ratio_zero(make_mae) -> None:
    model = make_mae()
    loss, _, mask = model(model.normalize(images(2)), no_masking(L, 2))
    assert mask.sum() == 0
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert len_keep_for_ratio(L, 0.0) == L


# ---------------------------------------------------------------------------------------------- position tables
def reference_sincos(embed_dim: int, gh: int, gw: int) -> np.ndarray:
    """The paper's table (MoCo v3 2-D sin-cos), channel by channel in float64, with the CLS row first.

    Patch (i, j) (row i, column j; raster index i * gw + j), quarter q = D / 4, k in [0, q):
      channel k         = sin(j * w_k)     channel q + k     = cos(j * w_k)
      channel 2q + k    = sin(i * w_k)     channel 3q + k    = cos(i * w_k)     with w_k = 1 / 10000 ** (k / q).
    """
    q = embed_dim // 4
    table = np.zeros((1 + gh * gw, embed_dim), dtype=np.float64)
    for i in range(gh):
        for j in range(gw):
            row = table[1 + i * gw + j]
            for k in range(q):
                w_k = 1.0 / 10000.0 ** (k / q)
                row[k], row[q + k] = np.sin(j * w_k), np.cos(j * w_k)
                row[2 * q + k], row[3 * q + k] = np.sin(i * w_k), np.cos(i * w_k)
    return table


@pytest.mark.parametrize(("dim", "grid"), [(32, (4, 4)), (16, (3, 5)), (768, (14, 14))])
def test_sincos_table_matches_the_paper_formula(dim: int, grid: tuple[int, int]) -> None:
    ours = sincos_2d(dim, grid).double().numpy()
    ref = reference_sincos(dim, *grid)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert not ours[0].any(), "the CLS row is zero"


def test_model_buffers_hold_the_sincos_tables(make_mae) -> None:
    model = make_mae()
    c = model.config
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), reference_sincos(c.embed_dim, 4, 4), atol=1e-6)
    np.testing.assert_allclose(
        model.decoder_pos_embed[0].double().numpy(), reference_sincos(c.decoder_embed_dim, 4, 4), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- serving entry points
def test_encode_never_runs_the_decoder(make_mae, monkeypatch) -> None:
    model = make_mae()

    def boom(*args, **kwargs):
        raise AssertionError("decoder ran")

    monkeypatch.setattr(model, "forward_decoder", boom)
    monkeypatch.setattr(model.decoder_blocks[0], "forward", boom)
    monkeypatch.setattr(model.decoder_pred, "forward", boom)
    out = model.encode(images(2))
    assert out.cls.shape == (2, 32) and out.patches.shape == (2, L, 32)
    assert out.patch_indices[0].tolist() == list(range(L))
    with pytest.raises(AssertionError, match="decoder ran"):
        model.reconstruct(images(1), random_masking_spec(L, 0.75, seed=0))


def test_reconstruct_on_an_encoder_only_model_raises(make_mae) -> None:
    model = make_mae(has_decoder=False)
    assert not hasattr(model, "decoder_blocks")
    assert model.encode(images(1)).patches.shape == (1, L, 32)
    with pytest.raises(DecoderMissingError, match="no pixel decoder"):
        model.reconstruct(images(1), random_masking_spec(L, 0.75, seed=0))


def test_norm_pix_loss_reconstruction_denormalises_per_patch(make_mae, monkeypatch) -> None:
    model: MAE = make_mae(norm_pix_loss=True)
    x = images(2)
    # A decoder that predicts the exact per-patch-standardised target must give back the image itself.
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids, grid: model.target(model.normalize(x)))
    out = model.reconstruct(x, random_masking_spec(L, 0.75, seed=4, batch=2))
    torch.testing.assert_close(out.reconstruction, x, atol=1e-5, rtol=0)
    assert out.mse.max() < 1e-9
    # Without the per-patch de-normalisation the same prediction is far from the image.
    model_raw = make_mae(norm_pix_loss=False)
    monkeypatch.setattr(model_raw, "forward_decoder", lambda latent, ids, grid: model.target(model.normalize(x)))
    assert model_raw.reconstruct(x, random_masking_spec(L, 0.75, seed=4, batch=2)).mse.min() > 1e-3
