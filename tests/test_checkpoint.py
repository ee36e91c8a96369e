"""Checkpoint loading: every supported layout, and every way a file can be wrong (one clear error each)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import MAE, DecoderMissingError
from model import formats as checkpoint
from model.config import get_config
from model.convert import main as convert_main
from model.formats import CheckpointError, load, save
from model.formats.mae_state import FIXED_TABLES
from model.masking import random_masking_spec

pytestmark = pytest.mark.unit

L = get_config("mae_test").num_patches


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def same_outputs(a: MAE, b: MAE, atol: float = 1e-6) -> None:
    x, m = images(2), random_masking_spec(L, 0.75, seed=1, batch=2)
    torch.testing.assert_close(a.encode(x).patches, b.encode(x).patches, atol=atol, rtol=0)
    if a.config.has_decoder and b.config.has_decoder:
        torch.testing.assert_close(a.reconstruct(x, m).pred, b.reconstruct(x, m).pred, atol=atol, rtol=0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def official_pth(mae: MAE, path: Path, **args: object) -> Path:
    """What facebookresearch/mae misc.save_model writes: model, optimizer, epoch, scaler, args."""
    params = list(mae.parameters())
    # AdamW's state_dict layout (built by hand: constructing a torch optimizer costs seconds of imports).
    optimizer = {
        "state": {i: {"step": torch.tensor(8.0), "exp_avg": p * 0, "exp_avg_sq": p * 0} for i, p in enumerate(params)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.05, "params": list(range(len(params)))}],
    }
    namespace = argparse.Namespace(model="mae_vit_base_patch16", input_size=32, mask_ratio=0.75, output_dir="./o")
    for k, v in args.items():
        setattr(namespace, k, v)
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "_growth_tracker": 0}
    torch.save(
        {"model": mae.state_dict(), "optimizer": optimizer, "epoch": 799, "scaler": scaler, "args": namespace}, path
    )
    return path


# ---------------------------------------------------------------------------------------------- own format
def test_own_format_round_trip_fp32(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    path = tmp_path / "m.safetensors"
    digest = save(model, path)
    assert digest == sha(path)
    loaded = load(path)
    assert (loaded.format, loaded.sha256, loaded.path) == ("mae-serve", digest, str(path))
    assert loaded.config == model.config and loaded.config.name == "mae_test"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    same_outputs(model, loaded.model, atol=0)


def test_own_format_fp16_storage_loads_as_fp32(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save(model, full)
    digest = save(model, half, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load(half)
    assert loaded.sha256 == digest == sha(half)
    for k, v in loaded.model.state_dict().items():
        assert v.dtype == torch.float32, k
        expected = model.state_dict()[k]
        # Fixed position tables stay exact; learned weights are fp16-rounded.
        assert torch.equal(v, expected if k in FIXED_TABLES else expected.half().float()), k
    assert not loaded.notes
    same_outputs(model, loaded.model, atol=5e-2)


def test_load_own_refuses_other_formats(make_mae, tmp_path: Path) -> None:
    path = official_pth(make_mae(), tmp_path / "o.pth")
    with pytest.raises(CheckpointError, match="not a mae-serve/1 file"):
        checkpoint.load_own(path)


# ---------------------------------------------------------------------------------------------- official / bare
def test_official_training_checkpoint_loads_with_its_args(make_mae, tmp_path: Path) -> None:
    model = make_mae(norm_pix_loss=True)
    path = official_pth(model, tmp_path / "checkpoint-799.pth", model="mae_test", norm_pix_loss=True)
    loaded = load(path)
    assert loaded.format == "mae-official" and loaded.sha256 == sha(path)
    # Heads and name from args.model; norm_pix_loss from args; eps is the official 1e-6.
    assert loaded.config == model.config and loaded.config.name == "mae_test"
    same_outputs(model, loaded.model)


def test_official_heads_from_known_shapes_or_paper_table(make_mae, tmp_path: Path) -> None:
    # No args: mae_test is recognised by its shapes.
    model = make_mae()
    torch.save({"model": model.state_dict()}, tmp_path / "a.pth")
    assert load(tmp_path / "a.pth").config == model.config
    # Unknown 64-wide model: the head_dim-64 fallback gives 1 head; an explicit override wins.
    odd = make_mae(embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_num_heads=4)
    torch.save({"model": odd.state_dict()}, tmp_path / "b.pth")
    assert load(tmp_path / "b.pth", num_heads=2, decoder_num_heads=4).config == odd.config
    with pytest.raises(CheckpointError, match="cannot infer the heads of a 32-d stack.*decoder_num_heads="):
        load(tmp_path / "b.pth")
    assert load(tmp_path / "b.pth", decoder_num_heads=4).config.num_heads == 1


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_bare_official_state_dict_loads(make_mae, tmp_path: Path, suffix: str) -> None:
    model = make_mae()
    path = tmp_path / f"bare{suffix}"
    state = model.state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load(path)
    assert loaded.format == "mae-official" and loaded.config == model.config
    same_outputs(model, loaded.model)


def test_encoder_only_official_file(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    encoder = {k: v for k, v in model.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_test.pth")
    loaded = load(tmp_path / "mae_pretrain_vit_test.pth")
    assert not loaded.config.has_decoder and loaded.config.num_heads == 4
    same_outputs(model, loaded.model)
    with pytest.raises(DecoderMissingError, match="encoder-only"):
        loaded.model.reconstruct(images(1), random_masking_spec(L, 0.75, seed=0))


def test_position_tables_come_from_the_file(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    state = model.state_dict()
    state["pos_embed"] = state["pos_embed"] * 0.5
    del state["decoder_pos_embed"]
    save_file(state, str(tmp_path / "p.safetensors"))
    loaded = load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.model.pos_embed, state["pos_embed"])
    assert torch.equal(loaded.model.decoder_pos_embed, model.decoder_pos_embed)
    assert any("pos_embed differs" in n for n in loaded.notes)
    assert any("decoder_pos_embed absent" in n for n in loaded.notes)


# ---------------------------------------------------------------------------------------------- timm
def test_timm_directory_and_bare_file(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    state = {k: v for k, v in model.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    state |= {"head.weight": torch.zeros(0, 32), "head.bias": torch.zeros(0)}  # timm's num_classes=0 export
    d = tmp_path / "vit_test_patch8_32.mae"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    config = {
        "architecture": "vit_test_patch8_32",
        "num_classes": 0,
        "num_features": 32,
        "global_pool": "token",
        "model_args": {"num_heads": 4},
        "pretrained_cfg": {"tag": "mae", "input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3},
    }
    (d / "config.json").write_text(json.dumps(config))
    loaded = load(d)
    assert loaded.format == "timm" and loaded.sha256 == sha(d / "model.safetensors")
    assert not loaded.config.has_decoder and loaded.config.layer_norm_eps == 1e-6
    assert loaded.config.pixel_mean == (0.5, 0.5, 0.5) and loaded.config.pixel_std == (0.25, 0.25, 0.25)
    x = images(1)
    torch.testing.assert_close(
        loaded.model.encode(x).patches, model.encode((x - 0.5) / 0.25 * model.pixel_std + model.pixel_mean).patches
    )
    # The same weights as a bare file: timm's head keys mark it as timm; heads from shapes (mae_test).
    save_file(state, str(tmp_path / "bare_timm.safetensors"))
    bare = load(tmp_path / "bare_timm.safetensors")
    assert bare.format == "timm" and bare.config.num_heads == 4
    same_outputs(model, bare.model)
    # A global-average-pool fine-tuned timm ViT is not an MAE encoder.
    save_file(state | {"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="fc_norm"):
        load(d)


# ---------------------------------------------------------------------------------------------- broken files
def test_truncated_files(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    own, pth = tmp_path / "own.safetensors", tmp_path / "o.pth"
    save(model, own)
    official_pth(model, pth)
    for path in (own, pth):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"own.safetensors: truncated"):
        load(own)
    with pytest.raises(CheckpointError, match=r"o.pth: truncated or not a PyTorch file"):
        load(pth)
    own.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load(own)


@pytest.mark.parametrize("name", ["noise.pth", "noise.safetensors", "noise.bin"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(bytes([0x42]) + os.urandom(4095))
    with pytest.raises(CheckpointError, match=f"{name}: not a checkpoint"):
        load(path)


class Exploit:
    """Unpickling this would run a shell command (creating the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_executing(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"model": {"cls_token": torch.zeros(1)}, "args": Exploit(marker)}, path)
    else:  # a plain pickle, as a legacy (pre-zip) torch file would start
        path.write_bytes(pickle.dumps({"args": Exploit(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil.pth: refused: the pickle needs the global (posix|os|nt)\.system"):
        load(path)
    assert not marker.exists()


def test_shape_mismatch_is_named(make_mae, tmp_path: Path) -> None:
    state = make_mae().state_dict()
    state["blocks.1.attn.qkv.weight"] = torch.zeros(48, 32)
    torch.save({"model": state}, tmp_path / "s.pth")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch at blocks.1.attn.qkv.weight: file \(48, 32\) vs model \(96, 32\)$"
    ):
        load(tmp_path / "s.pth")
    # A config that disagrees with its weights: own format whose metadata claims a wider model.
    model = make_mae()
    save(model, tmp_path / "w.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        meta = f.metadata()
    meta["config"] = json.dumps(model.config.replace(mlp_ratio=2.0).to_dict())
    save_file(load_file(str(tmp_path / "w.safetensors")), str(tmp_path / "w.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape mismatch at blocks.0.mlp.fc1.weight: .* \(and 8 more\)"):
        load(tmp_path / "w.safetensors")


def test_missing_decoder_keys_in_a_file_claiming_a_decoder(make_mae, tmp_path: Path) -> None:
    model = make_mae()
    path = tmp_path / "m.safetensors"
    save(model, path)  # the metadata config says has_decoder=True, decoder_depth=1
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("decoder_blocks.0.")}
    save_file(
        state, str(path), metadata={"format": checkpoint.FORMAT_TAG, "config": json.dumps(model.config.to_dict())}
    )
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: missing 12 decoder keys (decoder_blocks.0.")
    assert msg.endswith(", ...)") and "\n" not in msg and msg.count("decoder_blocks") == 3
    # An official file with decoder parts but no decoder blocks.
    torch.save({"model": state}, tmp_path / "o.pth")
    with pytest.raises(CheckpointError, match="no decoder blocks"):
        load(tmp_path / "o.pth")


def test_unexpected_and_non_finite(make_mae, tmp_path: Path) -> None:
    state = make_mae().state_dict()
    torch.save(
        {"model": state | {"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}}, tmp_path / "u.pth"
    )
    with pytest.raises(CheckpointError, match=r"2 unexpected keys \(head.weight, head.bias\)$"):
        load(tmp_path / "u.pth")
    state["norm.weight"] = state["norm.weight"].clone()
    state["norm.weight"][3] = float("nan")
    torch.save({"model": state}, tmp_path / "n.pth")
    with pytest.raises(CheckpointError, match="norm.weight contains NaN or inf"):
        load(tmp_path / "n.pth")


def test_unknown_layouts(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown directory layout"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown directory layout: config.json is neither.*'bert'"):
        load(tmp_path)
    save_file({"encoder.w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint layout \(1 tensors: encoder.w\)"):
        load(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "absent.pth")


def test_detectors_are_an_ordered_list_open_to_another_family(make_mae, tmp_path: Path, monkeypatch) -> None:
    seen = []

    def detect_other(raw: checkpoint.RawCheckpoint) -> checkpoint.LoadedModel | None:
        seen.append(sorted(raw.state)[:1])
        return None

    monkeypatch.setattr(checkpoint, "DETECTORS", [detect_other, *checkpoint.DETECTORS])
    model = make_mae()
    save(model, tmp_path / "m.safetensors")
    assert load(tmp_path / "m.safetensors").format == "mae-serve"
    assert seen == [["blocks.0.attn.proj.bias"]]


# ---------------------------------------------------------------------------------------------- convert CLI
def test_convert_cli(make_mae, tmp_path: Path, capsys) -> None:
    model = make_mae()
    src = official_pth(model, tmp_path / "checkpoint.pth", model="mae_test")
    dst = tmp_path / "out" / "converted.safetensors"
    assert convert_main([str(src), str(dst), "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "mae-official" in out and sha(src) in out and sha(dst) in out and "mae_test" in out
    loaded = load(dst)
    assert loaded.format == "mae-serve" and loaded.config == model.config
    same_outputs(model, loaded.model, atol=5e-2)
    assert convert_main([str(tmp_path / "absent.pth"), str(dst)]) == 2
    assert "no such file" in capsys.readouterr().err
