"""Fidelity against Hugging Face ViTMAE: the same weights, saved three ways, give the same numbers in our MAE.

A randomly initialised `ViTMAEForPreTraining` (every parameter random, position tables the sin-cos table HF
builds itself) is written as (1) what this transformers' save_pretrained writes, (2) the hub's legacy key
layout (facebook/vit-mae-*), (3) an official facebookresearch/mae `.pth` (the key mapping of transformers'
convert_vit_mae_to_pytorch.py, reversed). Each is loaded with `model.formats.load` and compared in fp32.

Known difference, kept on purpose: for inputs of another size HF's *decoder* resamples its position table as a
1-D sequence of H*W rows (`ViTMAEDecoder.interpolate_pos_encoding`), which mixes neighbouring rows of the grid;
ours resamples the 2-D grid bicubically, exactly as HF's *encoder* does. The encoder matches HF at any size;
the decoder matches HF once HF's decoder is given the 2-D table (test_other_sizes_match_hf).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import IMAGENET_MEAN, IMAGENET_STD
from model.formats import CheckpointError, load, sha256_of
from model.masking import Masking, len_keep_for_ratio
from model.pos_embed import interpolate_pos_embed

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

pytestmark = pytest.mark.unit

HF_CONFIG = dict(  # the mae_test shapes: image 32, patch 8 (16 patches), 32-d x 2, decoder 16-d x 1
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    mask_ratio=0.75,
)
L = 16
TOL = 1e-5
LAYOUTS = ("save_pretrained", "hub_legacy", "hub_legacy_bin", "official_pth")


def hf_sincos(dim: int, side: int) -> torch.Tensor:
    """HF's own (1, 1 + side^2, dim) table, built the way ViTMAE's initialize_weights builds it."""
    from transformers.models.vit_mae import modeling_vit_mae as m

    if hasattr(m, "build_2d_sinusoidal_position_embedding"):  # transformers 5.x: rotate to the official layout
        t = m.build_2d_sinusoidal_position_embedding(side, side, embed_dim=dim, cls_token=True)
        return torch.cat([t[..., dim // 2 :], t[..., : dim // 2]], dim=-1)[None].float()
    return torch.from_numpy(m.get_2d_sincos_pos_embed(dim, side, add_cls_token=True))[None].float()  # 4.x


def to_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory HF names (5.x renames them) -> the key names in facebook/vit-mae-* files."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", k)
        for new, old in (
            ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            k = k.replace(new, old)
        out[k] = v.contiguous()
    return out


def hub_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_vit_mae_to_pytorch.py (official -> HF), reversed: rename back, fuse query/key/value into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        for hf, official in (
            ("vit.embeddings.cls_token", "cls_token"),
            ("vit.embeddings.position_embeddings", "pos_embed"),
            ("vit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
            ("decoder.decoder_layers.", "decoder_blocks."),
            ("vit.encoder.layer.", "blocks."),
            ("attention.output.dense", "attn.proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
            ("decoder.decoder_embed", "decoder_embed"),
            ("decoder.decoder_norm", "decoder_norm"),
            ("decoder.decoder_pred", "decoder_pred"),
            ("decoder.mask_token", "mask_token"),
            ("decoder.decoder_pos_embed", "decoder_pos_embed"),
            ("vit.layernorm.", "norm."),
        ):
            k = k.replace(hf, official)
        m = re.match(r"^(.*)\.attention\.attention\.(query|key|value)\.(weight|bias)$", k)
        if m:
            qkv.setdefault(f"{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = v
        else:
            out[k] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def make_hf(norm_pix_loss: bool, randomize) -> ViTMAEForPreTraining:
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(ViTMAEConfig(**HF_CONFIG, norm_pix_loss=norm_pix_loss))
    randomize(hf, 1)  # 5.x leaves biases, tokens and even the tables at 0 in a fresh model
    with torch.no_grad():
        hf.vit.embeddings.position_embeddings.copy_(hf_sincos(32, 4))
        hf.decoder.decoder_pos_embed.copy_(hf_sincos(16, 4))
    return hf.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["pixels", "norm_pix_loss"])
def saved(request, tmp_path_factory, randomize) -> dict[str, object]:
    """The HF model and its three files on disk."""
    norm_pix_loss = request.param
    hf = make_hf(norm_pix_loss, randomize)
    root = tmp_path_factory.mktemp("norm_pix" if norm_pix_loss else "pix")
    hf.save_pretrained(root / "save_pretrained")
    hub = root / "hub_legacy"
    hub.mkdir()
    hub_state = to_hub_layout(hf.state_dict())
    save_file(hub_state, str(hub / "model.safetensors"), metadata={"format": "pt"})
    (hub / "config.json").write_text((root / "save_pretrained" / "config.json").read_text())
    (root / "hub_legacy_bin").mkdir()  # the older hub files: pytorch_model.bin
    torch.save(hub_state, root / "hub_legacy_bin" / "pytorch_model.bin")
    (root / "hub_legacy_bin" / "config.json").write_text((hub / "config.json").read_text())
    args = argparse.Namespace(model="mae_vit_test", input_size=32, norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    torch.save({"model": hub_to_official(hub_state), "epoch": 0, "args": args}, root / "official.pth")
    paths = {layout: root / layout for layout in LAYOUTS} | {"official_pth": root / "official.pth"}
    return {"hf": hf, "paths": paths, "norm_pix_loss": norm_pix_loss}


def inputs(n: int = 3, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and the same images normalised as HF's image processor would."""
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(5))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, (x - mean) / std


def noise(n: int, length: int) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(6))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_fixtures_are_what_transformers_loads(saved) -> None:
    """The hub-layout directory (and save_pretrained's) reload in HF to the very same model."""
    hf = saved["hf"]
    _, pixels = inputs()
    with torch.no_grad():
        ref = hf(pixels, noise=noise(3, L)).logits
        for layout in ("save_pretrained", "hub_legacy"):
            again = ViTMAEForPreTraining.from_pretrained(saved["paths"][layout]).eval()
            assert maxdiff(again(pixels, noise=noise(3, L)).logits, ref) == 0.0, layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pretraining_forward_matches_hf(saved, layout: str) -> None:
    hf, path = saved["hf"], saved["paths"][layout]
    loaded = load(path)
    expected_format = "mae-official" if layout == "official_pth" else "hf-vitmae"
    assert loaded.format == expected_format
    weights = path if path.is_file() else next(p for p in path.iterdir() if p.name.startswith(("model.", "pytorch_")))
    assert loaded.sha256 == sha256_of(weights)
    c = loaded.config
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (
        32,
        2,
        4,
        16,
        1,
        2,
    )
    assert c.norm_pix_loss == saved["norm_pix_loss"]
    assert c.layer_norm_eps == (1e-6 if layout == "official_pth" else 1e-12)
    # HF's table (its own code) equals ours, and was loaded, not recomputed.
    assert maxdiff(loaded.model.pos_embed, hf.vit.embeddings.position_embeddings) < 1e-7
    assert not loaded.notes

    if layout == "official_pth":
        # The official model's LayerNorms use eps 1e-6 (HF configs say 1e-12): compare with HF at 1e-6.
        hf = copy.deepcopy(hf)
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-6
    _, pixels = inputs()
    z = noise(3, L)
    assert len_keep_for_ratio(L, 0.75) == int(L * (1 - HF_CONFIG["mask_ratio"]))
    with torch.no_grad():
        ref = hf(pixels, noise=z)
        loss, pred, mask = loaded.model(pixels, Masking(z, len_keep_for_ratio(L, 0.75)))
    assert torch.equal(mask, ref.mask)
    d_pred, d_loss = maxdiff(pred, ref.logits), maxdiff(loss, ref.loss)
    print(f"\n[{layout}, norm_pix_loss={saved['norm_pix_loss']}] logits {d_pred:.2e}  loss {d_loss:.2e}")
    assert d_pred < TOL and d_loss < TOL
    # The serving path ([0, 1] images in) gives the same predictions.
    x, _ = inputs()
    assert maxdiff(loaded.model.reconstruct(x, Masking(z, 4)).pred, ref.logits) < TOL


def test_embeddings_match_vitmaemodel(saved, tmp_path: Path) -> None:
    hf = saved["hf"]
    encoder = ViTMAEModel(ViTMAEConfig(**{**HF_CONFIG, "mask_ratio": 0.0}))
    encoder.load_state_dict(hf.vit.state_dict())
    encoder.eval().save_pretrained(tmp_path / "vitmaemodel")  # no "vit." prefix, no decoder
    x, pixels = inputs()
    with torch.no_grad():
        ref = encoder(pixels, noise=torch.arange(L, dtype=torch.float32).expand(3, L)).last_hidden_state
    for source in (saved["paths"]["hub_legacy"], tmp_path / "vitmaemodel"):
        loaded = load(source)
        out = loaded.model.encode(x)  # masking=None: every patch, raster order
        d_cls, d_patches = maxdiff(out.cls, ref[:, 0]), maxdiff(out.patches, ref[:, 1:])
        print(f"\n[embeddings {source.name}] cls {d_cls:.2e}  patches {d_patches:.2e}")
        assert d_cls < TOL and d_patches < TOL
    assert not loaded.config.has_decoder and loaded.format == "hf-vitmae"
    with pytest.raises(Exception, match="no pixel decoder"):
        loaded.model.reconstruct(x, Masking(noise(3, L), 4))


def hf_decoder_2d(hf: ViTMAEForPreTraining, grid: tuple[int, int]):
    """HF's decoder position resampling replaced by the 2-D one its encoder uses (= ours)."""

    def interpolate(embeddings: torch.Tensor) -> torch.Tensor:
        return interpolate_pos_embed(hf.decoder.decoder_pos_embed, grid)

    return interpolate


@pytest.mark.parametrize("hw", [(48, 32), (64, 64), (24, 40)])
def test_other_sizes_match_hf(saved, hw: tuple[int, int], monkeypatch) -> None:
    hf = saved["hf"]
    loaded = load(saved["paths"]["hub_legacy"])
    grid = (hw[0] // 8, hw[1] // 8)
    length = grid[0] * grid[1]
    x, pixels = inputs(2, *hw)
    # The interpolated table itself: ours equals HF's encoder interpolation exactly.
    emb = torch.zeros(1, 1 + length, 32)
    ref_table = hf.vit.embeddings.interpolate_pos_encoding(emb, *hw)
    assert maxdiff(interpolate_pos_embed(loaded.model.pos_embed, grid), ref_table) == 0.0
    # Embeddings of every patch (ViTMAEModel, mask ratio 0, ordered noise).
    encoder = ViTMAEModel(ViTMAEConfig(**{**HF_CONFIG, "mask_ratio": 0.0}))
    encoder.load_state_dict(hf.vit.state_dict())
    ordered = torch.arange(length, dtype=torch.float32).expand(2, length)
    with torch.no_grad():
        ref = encoder.eval()(pixels, noise=ordered, interpolate_pos_encoding=True).last_hidden_state
    out = loaded.model.encode(x)
    d_enc = max(maxdiff(out.cls, ref[:, 0]), maxdiff(out.patches, ref[:, 1:]))
    # The full pre-training forward with a random mask.
    z = noise(2, length)
    masking = Masking(z, len_keep_for_ratio(length, 0.75))
    with torch.no_grad():
        loss, pred, mask = loaded.model(pixels, masking)
        hf_1d = hf(pixels, noise=z, interpolate_pos_encoding=True)
        monkeypatch.setattr(hf.decoder, "interpolate_pos_encoding", hf_decoder_2d(hf, grid))
        hf_2d = hf(pixels, noise=z, interpolate_pos_encoding=True)
    assert torch.equal(mask, hf_2d.mask)
    d_pred, d_loss = maxdiff(pred, hf_2d.logits), maxdiff(loss, hf_2d.loss)
    print(
        f"\n[{hw[0]}x{hw[1]}] embeddings {d_enc:.2e}  logits {d_pred:.2e}  loss {d_loss:.2e}  "
        f"(HF's own 1-D decoder resampling: logits differ by {maxdiff(pred, hf_1d.logits):.2e})"
    )
    assert d_enc < TOL and d_pred < TOL and d_loss < TOL


def test_broken_hf_directories(saved, tmp_path: Path) -> None:
    src = saved["paths"]["hub_legacy"]
    config = json.loads((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))

    def write(name: str, state: dict[str, torch.Tensor], **changes: object) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config | changes))
        return d

    # A ViTMAEForPreTraining config claims a decoder; these weights have none.
    encoder_only = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match=r"missing 19 decoder keys \(mask_token, decoder_embed.weight, "):
        load(write("no_decoder", encoder_only))
    with pytest.raises(CheckpointError, match=r"shape mismatch at cls_token: file \(1, 1, 32\) vs model \(1, 1, 64\)"):
        load(write("wider", state, hidden_size=64, intermediate_size=256))
    no_value = {k: v for k, v in state.items() if "layer.1.attention.attention.value" not in k}
    with pytest.raises(CheckpointError, match=r"blocks.1 attention has no value (weight|bias): incomplete"):
        load(write("no_value", no_value))
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        load(write("relu", state, hidden_act="relu"))
