"""The vit-pytorch family against lucidrains' vit-pytorch itself (the reference, a test-only dependency).

A small random ViT + MAE is built with vit-pytorch, its state_dict saved with a sidecar and loaded with
model.vit_pytorch_mae; the reference's random masking is driven by replacing torch.rand during its forward.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from model import MAE, DecoderMissingError
from model.config import get_config
from model.formats import CheckpointError
from model.formats.vit_pytorch import config_from, is_vit_pytorch_state, load_vit_pytorch
from model.masking import Masking, explicit_masking
from model.vit_pytorch_mae import VitPytorchMAE, masking_from_rand, num_masked_for

pytestmark = pytest.mark.unit

TOL = 1e-5
IMG, PATCH, L = 32, 8, 16
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]  # a non-trivial input space, so normalisation is exercised
# name -> (ViT kwargs, MAE kwargs); "narrow" makes vit-pytorch drop to_out (heads 1, dim_head == dim) and enc_to_dec.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "small": (dict(dim=64, heads=4, dim_head=16), dict(decoder_dim=32, decoder_heads=4, decoder_dim_head=8)),
    "narrow": (dict(dim=32, heads=1, dim_head=32), dict(decoder_dim=32, decoder_heads=1, decoder_dim_head=32)),
}
DIFFS: dict[str, float] = {}  # max abs differences, printed at the end (pytest -s) for the record


@pytest.fixture(scope="module")
def ref() -> Iterator[types.SimpleNamespace]:
    """vit_pytorch.vit and vit_pytorch.mae. The package __init__ imports torchvision (for Dino), which we do not
    need: without it, the two modules are imported under a bare package object instead."""
    pytest.importorskip("einops")
    if importlib.util.find_spec("vit_pytorch") is None:
        pytest.skip("vit-pytorch (the reference) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        try:
            importlib.import_module("vit_pytorch")
        except ModuleNotFoundError as e:
            if e.name != "torchvision":
                raise
            pkg = types.ModuleType("vit_pytorch")
            pkg.__path__ = list(importlib.util.find_spec("vit_pytorch").submodule_search_locations or [])
            mp.setitem(sys.modules, "vit_pytorch", pkg)
        yield types.SimpleNamespace(
            vit=importlib.import_module("vit_pytorch.vit"),
            mae=importlib.import_module("vit_pytorch.mae"),
            version=importlib.metadata.version("vit-pytorch"),
        )
    if DIFFS:
        print("\nvit-pytorch", importlib.metadata.version("vit-pytorch"), "max abs diffs:")
        for k, v in sorted(DIFFS.items()):
            print(f"  {k}: {v:.2e}")


def make_reference(ref: types.SimpleNamespace, pool: str, variant: str = "small", seed: int = 0) -> torch.nn.Module:
    """A random vit-pytorch MAE; every parameter perturbed so that LayerNorms etc. are not at identity."""
    vit_kw, mae_kw = VARIANTS[variant]
    torch.manual_seed(seed)
    vit = ref.vit.ViT(
        image_size=IMG, patch_size=PATCH, num_classes=10, depth=2, mlp_dim=2 * vit_kw["dim"], pool=pool, **vit_kw
    )
    mae = ref.mae.MAE(encoder=vit, masking_ratio=0.75, decoder_depth=1, **mae_kw)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mae.eval()


def sidecar(pool: str, variant: str = "small", decoder: bool = True, **over: Any) -> dict[str, Any]:
    vit_kw, mae_kw = VARIANTS[variant]
    side = dict(image_size=IMG, patch_size=PATCH, heads=vit_kw["heads"], dim_head=vit_kw["dim_head"], pool=pool)
    if decoder:
        side.update(decoder_heads=mae_kw["decoder_heads"], decoder_dim_head=mae_kw["decoder_dim_head"])
    side.update(pixel_mean=MEAN, pixel_std=STD, masking_ratio=0.75)
    side.update(over)
    return {k: v for k, v in side.items() if v is not None}


def save(tmp_path: Path, state: dict[str, torch.Tensor], side: dict[str, Any] | None, name: str = "model") -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    if side is not None:
        (tmp_path / f"{name}.json").write_text(json.dumps(side))
    return path


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def run_reference(mae: torch.nn.Module, imgs: torch.Tensor, rand: torch.Tensor, mp: pytest.MonkeyPatch) -> dict:
    """The reference's forward with `rand` as its torch.rand draw; hooks catch all decoded tokens and masked preds."""
    caught: dict[str, torch.Tensor] = {}
    hooks = [
        mae.decoder.register_forward_hook(lambda m, i, o: caught.__setitem__("decoded", o)),
        mae.to_pixels.register_forward_hook(lambda m, i, o: caught.__setitem__("masked_pred", o)),
    ]
    with mp.context() as m:
        m.setattr(torch, "rand", lambda *a, **k: rand.clone())
        with torch.no_grad():
            loss = mae(imgs)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        all_pred = mae.to_pixels(caught["decoded"])
    return dict(loss=loss, masked_pred=caught["masked_pred"], all_pred=all_pred)


def record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs().max().item()
    DIFFS[name] = max(DIFFS.get(name, 0.0), d)
    return d


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_reconstruct_and_loss_match_reference(ref, tmp_path, monkeypatch, pool: str, variant: str) -> None:
    mae = make_reference(ref, pool, variant)
    loaded = load_vit_pytorch(save(tmp_path, mae.state_dict(), sidecar(pool, variant)))
    ours = loaded.model
    assert isinstance(ours, VitPytorchMAE) and ours.family == "vit-pytorch" and loaded.format == "vit-pytorch"
    assert ours.config.has_decoder and ours.config.pool == pool and not ours.config.norm_pix_loss
    assert ours.config.has_enc_to_dec == (variant == "small")
    # Same parameter count as the reference minus the classifier we do not serve.
    head = sum(p.numel() for p in mae.encoder.mlp_head.parameters())
    assert ours.num_parameters() == sum(p.numel() for p in mae.parameters()) - head

    x01 = images()
    rand = torch.rand(3, L, generator=torch.Generator().manual_seed(2))
    expect = run_reference(mae, ours.normalize(x01), rand, monkeypatch)

    masking = masking_from_rand(rand, 0.75)
    out = ours.reconstruct(x01, masking)
    num_masked = num_masked_for(L, 0.75)
    masked_ids = rand.argsort(dim=-1)[:, :num_masked]  # the reference's masked_indices, in its order
    rows = torch.arange(3)[:, None]
    # The same patches are masked.
    ref_mask = torch.zeros(3, L).scatter(1, masked_ids, 1.0)
    assert torch.equal(out.mask, ref_mask) and torch.equal(masking.mask(), ref_mask)
    assert record(f"pred masked ({pool}, {variant})", out.pred[rows, masked_ids], expect["masked_pred"]) < TOL
    assert record(f"pred all ({pool}, {variant})", out.pred, expect["all_pred"]) < TOL
    loss = ours.loss(ours.normalize(x01), masking)
    assert record(f"loss ({pool}, {variant})", loss, expect["loss"]) < TOL

    # The images follow MAE.reconstruct's meanings, in [0, 1].
    recon = ours.denormalize(ours.unpatchify(out.pred)).clamp(0, 1)
    assert torch.allclose(out.reconstruction, recon)
    m = ours.unpatchify(out.mask[..., None].expand(-1, -1, 3 * PATCH * PATCH))
    assert torch.allclose(out.paste, x01 * (1 - m) + recon * m) and torch.allclose(out.masked, x01 * (1 - m))
    err = ((ours.patchify(recon) - ours.patchify(x01)) ** 2).mean(-1) * out.mask
    assert torch.allclose(out.patch_error, err) and torch.allclose(out.mse, err.sum(1) / num_masked)
    assert out.grid == (4, 4) and out.pred.shape == (3, L, 3 * PATCH * PATCH)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_encoder_only_embeddings_match_reference_vit(ref, tmp_path, pool: str) -> None:
    mae = make_reference(ref, pool)
    vit = mae.encoder
    loaded = load_vit_pytorch(save(tmp_path, vit.state_dict(), sidecar(pool, decoder=False)))
    ours = loaded.model
    assert not ours.config.has_decoder and ours.config.decoder_embed_dim is None
    assert is_vit_pytorch_state(vit.state_dict())

    x01 = images()
    caught: dict[str, torch.Tensor] = {}
    hook = vit.transformer.register_forward_hook(lambda m, i, o: caught.__setitem__("out", o))
    with torch.no_grad():
        vit(ours.normalize(x01))
    hook.remove()
    expect = caught["out"]  # the ViT's tokens after its transformer's final norm
    enc = ours.encode(x01)
    n_cls = 1 if pool == "cls" else 0
    assert record(f"encode patches ({pool})", enc.patches, expect[:, n_cls:]) < TOL
    assert torch.equal(enc.patch_indices, torch.arange(L).expand(3, L))
    if pool == "cls":
        assert record("encode cls", enc.cls, expect[:, 0]) < TOL
    else:
        assert enc.cls is None
    with pytest.raises(DecoderMissingError):
        ours.reconstruct(x01, masking_from_rand(torch.rand(3, L), 0.75))

    # The full MAE's weights embed identically.
    full = load_vit_pytorch(save(tmp_path, mae.state_dict(), sidecar(pool), name="full")).model
    assert torch.allclose(full.encode(x01).patches, enc.patches, atol=1e-6)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_masked_encode_is_the_vit_on_visible_patches(ref, tmp_path, pool: str) -> None:
    mae = make_reference(ref, pool)
    vit = mae.encoder
    ours = load_vit_pytorch(save(tmp_path, vit.state_dict(), sidecar(pool, decoder=False))).model
    x01 = images(1)
    masking = explicit_masking([0, 3, 5, 6, 9, 15], L)
    keep = torch.tensor([i for i in range(L) if i not in {0, 3, 5, 6, 9, 15}])
    n_cls = 1 if pool == "cls" else 0
    with torch.no_grad():  # ViT.forward's steps, on the visible patches only
        x = vit.to_patch_embedding(ours.normalize(x01))
        x = torch.cat([vit.cls_token, x], dim=1) + vit.pos_embedding
        x = vit.transformer(torch.cat([x[:, :n_cls], x[:, n_cls:][:, keep]], dim=1))
    enc = ours.encode(x01, masking)
    assert torch.equal(enc.patch_indices[0], keep)
    assert record(f"masked encode ({pool})", enc.patches, x[:, n_cls:]) < TOL


def test_state_dict_keys_are_vit_pytorchs(ref, tmp_path) -> None:
    for pool in ("cls", "mean"):
        for variant in VARIANTS:
            mae = make_reference(ref, pool, variant)
            ours = load_vit_pytorch(save(tmp_path, mae.state_dict(), sidecar(pool, variant))).model
            # minus the classifier and vit-pytorch's alias of the patch embedding (patch_to_emb.*)
            theirs = {k for k in mae.state_dict() if not k.startswith(("encoder.mlp_head.", "patch_to_emb."))}
            assert set(ours.state_dict()) == theirs


def test_safetensors_and_wrapped_checkpoints_load(ref, tmp_path) -> None:
    mae = make_reference(ref, "mean")  # pool='mean': a zero-size cls_token goes through safetensors too
    state = {k: v.clone() for k, v in mae.state_dict().items()}  # safetensors refuses the aliased patch_to_emb.*
    save_file(state, str(tmp_path / "st.safetensors"))
    (tmp_path / "st.json").write_text(json.dumps(sidecar("mean")))
    a = load_vit_pytorch(tmp_path / "st.safetensors")
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    b = load_vit_pytorch(save(tmp_path, wrapped, sidecar("mean"), name="wrapped"))
    x01 = images(2)
    m = masking_from_rand(torch.rand(2, L), 0.75)
    assert torch.equal(a.model.reconstruct(x01, m).pred, b.model.reconstruct(x01, m).pred)
    assert len(a.sha256) == 64 and a.sha256 != b.sha256 and a.config.to_dict()["family"] == "vit-pytorch"


def test_reference_version(ref) -> None:
    # Verified against 1.16.0 (the pinned dev dependency); later releases reportedly change pool='cls'.
    assert ref.version == "1.16.0", f"parity was verified on vit-pytorch 1.16.0, found {ref.version}"


# --------------------------------------------------------------------------------------------- no reference needed
def own_state(pool: str = "cls", decoder: bool = True) -> dict[str, torch.Tensor]:
    """A state_dict with vit-pytorch's keys and shapes ("small" variant), made by our own module."""
    state = {
        "encoder.pos_embedding": torch.zeros(1, L + (pool == "cls"), 64),
        "encoder.to_patch_embedding.1.weight": torch.zeros(192),
        "encoder.transformer.layers.0.0.to_qkv.weight": torch.zeros(3 * 64, 64),
        "encoder.transformer.layers.0.1.net.1.weight": torch.zeros(128, 64),
        "encoder.transformer.layers.1.0.to_qkv.weight": torch.zeros(3 * 64, 64),
        "encoder.cls_token": torch.zeros(1, int(pool == "cls"), 64),
    }
    if decoder:
        state.update(
            {
                "enc_to_dec.weight": torch.zeros(32, 64),
                "mask_token": torch.zeros(32),
                "decoder_pos_emb.weight": torch.zeros(L + (pool == "cls"), 32),  # as 1.16.0 sizes it
                "to_pixels.weight": torch.zeros(192, 32),
                "decoder.layers.0.0.to_qkv.weight": torch.zeros(3 * 32, 32),
                "decoder.layers.0.1.net.1.weight": torch.zeros(128, 32),
            }
        )
    config = config_from(state, sidecar(pool), "own")
    return VitPytorchMAE(config).state_dict()


def test_detection() -> None:
    state = own_state()
    assert is_vit_pytorch_state(state)
    assert is_vit_pytorch_state({k.removeprefix("encoder."): v for k, v in own_state(decoder=False).items()})
    assert is_vit_pytorch_state({"state_dict": {f"module.{k}": v for k, v in state.items()}})
    assert not is_vit_pytorch_state(MAE(get_config("mae_test")).state_dict())
    assert not is_vit_pytorch_state({})


def test_masking_correspondence() -> None:
    # ratio 0.7 of 16: vit-pytorch masks int(11.2) = 11 and keeps 5 (our len_keep_for_ratio would keep 4).
    rand = torch.rand(4, L, generator=torch.Generator().manual_seed(0))
    m = masking_from_rand(rand, 0.7)
    assert m.len_keep == 5
    theirs_unmasked = rand.argsort(dim=-1)[:, 11:]
    ours_visible = torch.argsort(m.noise, dim=1)[:, : m.len_keep]
    assert torch.equal(theirs_unmasked.sort(1).values, ours_visible.sort(1).values)


def test_loss_is_zero_not_nan_without_masking() -> None:
    model = VitPytorchMAE(config_from(own_state(), sidecar("cls"), "own"))
    x = model.normalize(images(1))
    assert model.loss(x, Masking(torch.arange(L, dtype=torch.float32)[None], L)).item() == 0.0


def test_wrong_image_size_is_refused() -> None:
    model = VitPytorchMAE(config_from(own_state(), sidecar("cls"), "own"))
    with pytest.raises(ValueError, match="takes 32x32"):
        model.encode(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (dict(heads=3), "heads=3 does not divide the attention width 64"),
        (dict(dim_head=32), "heads * dim_head = 4 * 32 = 128, the weights have 64"),
        (dict(decoder_heads=3), "decoder_heads=3 does not divide the attention width 32"),
        (dict(patch_size=4), "channels * patch_size^2 = 48, the patch embedding takes 192"),
        (dict(image_size=64), "pos_embedding has 17 positions, (64/8)^2 patches + 1 cls = 65"),
        (dict(image_size=30), "image_size 30 is not a multiple of patch_size 8"),
        (dict(pool="mean"), "pool='mean' but the weights' cls_token holds 1 token(s)"),
        (dict(pixel_std=[1, 1]), "pixel_std must be a number or a list of 3 numbers"),
        (dict(channels=1), "channels must be 3"),
        (dict(heads=None), "sidecar lacks required keys ['heads']"),
        (dict(pixel_mean=None, pixel_std=None), "sidecar lacks required keys ['pixel_mean', 'pixel_std']"),
        (dict(head=4), "unknown sidecar keys ['head']"),
    ],
)
def test_inconsistent_sidecar_fails_in_one_line(tmp_path, over: dict[str, Any], needle: str) -> None:
    side = {k: v for k, v in {**sidecar("cls"), **over}.items() if v is not None}
    path = save(tmp_path, own_state(), side)
    with pytest.raises(CheckpointError) as e:
        load_vit_pytorch(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(path) in msg and "model.json" in msg


def test_missing_or_broken_sidecar(tmp_path) -> None:
    path = save(tmp_path, own_state(), None)
    with pytest.raises(CheckpointError, match=r"need a sidecar config model\.json"):
        load_vit_pytorch(path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_vit_pytorch(path)


def test_encoder_only_does_not_need_decoder_keys(tmp_path) -> None:
    enc = {k.removeprefix("encoder."): v for k, v in own_state(decoder=False).items()}
    enc["mlp_head.weight"] = torch.zeros(10, 64)  # the ViT's classifier: present in a ViT state, not served
    loaded = load_vit_pytorch(save(tmp_path, enc, sidecar("cls", decoder=False)))
    assert not loaded.config.has_decoder and loaded.config.to_dict()["has_decoder"] is False


def test_partial_weights_fail_in_one_line(tmp_path) -> None:
    state = own_state()
    del state["decoder.norm.weight"]
    with pytest.raises(CheckpointError, match="missing: decoder.norm.weight") as e:
        load_vit_pytorch(save(tmp_path, state, sidecar("cls")))
    assert "\n" not in str(e.value)
