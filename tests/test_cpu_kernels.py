"""The model's CPU kernels and compilation: oneDNN linears and torch.compile answer as stock eager PyTorch, with
every MAE_CPU_KERNELS; a warm-up that fails says which setting to change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.serving.cpu_kernels import OneDNNLinear, onednn_linear_works, prepare_cpu_kernels
from app.serving.registry import ModelLoadError
from model import MAE, get_config
from model.masking import Masking, random_noise

pytestmark = pytest.mark.unit


@pytest.mark.skipif(not onednn_linear_works(), reason="no oneDNN linear in this torch build")
def test_onednn_linears_match_stock_pytorch():
    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    x = torch.rand(3, 3, 32, 32)
    masking = Masking(random_noise(3, 16, seed=0), 4)
    ref = model.reconstruct(x, masking).pred
    for kernels in ("onednn", "onednn-packed"):
        fast = MAE(get_config("mae_test")).eval()
        fast.load_state_dict(model.state_dict())
        n = prepare_cpu_kernels(fast, kernels)
        assert n == sum(type(m) is OneDNNLinear for m in fast.modules()) > 0
        assert set(fast.state_dict()) == set(model.state_dict())
        assert torch.allclose(fast.reconstruct(x, masking).pred, ref, atol=1e-5)
    assert prepare_cpu_kernels(MAE(get_config("mae_test")), "stock") == 0
    with torch.enable_grad():  # training is left to PyTorch's own kernels
        layer = nn.Linear(4, 3)
        layer.__class__ = OneDNNLinear
        layer(torch.rand(2, 4)).sum().backward()
        assert layer.weight.grad is not None


@pytest.mark.parametrize("kernels", ["stock", "onednn", "onednn-packed", "auto"])
def test_compiled_stacks_answer_as_eager(make_settings, kernels):
    """MAE_COMPILE (torch.compile of the transformer stacks; inductor on this CPU): the same answers as eager, within
    fp32 rounding, whichever MAE_CPU_KERNELS is chosen (oneDNN's linear once broke inductor's lowering).
    reduce-overhead (CUDA graphs) needs a GPU and has not run here."""
    from tests.serving import app_client, image_bytes

    png = image_bytes(48, 40)
    answers = {}
    for mode in ("off", "default"):
        with app_client(make_settings(compile=mode, cpu_kernels=kernels, warmup=False)) as c:
            params = {"format": "json", "seed": 5}
            r = c.post("/v1/reconstruct", params=params, content=png, headers={"Content-Type": "image/png"})
            e = c.post("/v1/embed", content=png, headers={"Content-Type": "image/png"})
            assert r.status_code == e.status_code == 200
            answers[mode] = (r.json(), e.json())
            stacks = c.app.state.readiness.service.registry.get(None).model.transformer_stacks()
            assert all((s._compiled_call_impl is not None) == (mode != "off") for s in stacks)  # really compiled
    (r0, e0), (r1, e1) = answers["off"], answers["default"]
    assert r0["mask"] == r1["mask"] and abs(r0["mse"] - r1["mse"]) < 1e-6
    assert np.allclose(e0["patches"], e1["patches"], atol=1e-5) and np.allclose(e0["cls"], e1["cls"], atol=1e-5)


@pytest.mark.parametrize(
    ("error", "compile_mode", "names"),
    [
        (
            RuntimeError("kernel not found\nsecond line"),
            "off",
            ("MAE_DEVICE=", "MAE_CPU_KERNELS=stock", "MAE_WARMUP=0"),
        ),
        (None, "default", ("MAE_COMPILE=default", "MAE_CPU_KERNELS=", "set MAE_COMPILE=off")),
    ],
)
def test_a_failed_warm_up_names_the_setting_to_change(make_settings, error, compile_mode, names):
    """Start-up stops on a failed warm-up with one line that says where it failed and which MAE_* setting to change,
    not a bare exception class (a compile failure once left `InductorError: LoweringException: AssertionError:`)."""
    import torch._dynamo.exc

    from app.http.main import create_app

    planted = error if error is not None else torch._dynamo.exc.TorchRuntimeError("lowering failed")
    failures: list[str] = []

    def forward(*_):  # type: ignore[no-untyped-def]
        raise planted

    settings = make_settings(compile=compile_mode, warmup=True)
    app = create_app(settings, forward=forward, load_in_background=False, on_load_failure=failures.append)
    with pytest.raises(ModelLoadError), TestClient(app):
        pass
    assert len(failures) == 1 and "\n" not in failures[0], failures
    line = failures[0]
    assert line.startswith("warm-up failed on cpu/float32: ") and type(planted).__name__ in line, line
    assert all(n in line for n in names), line
