"""The performance paths of the engine, imaging and rendering (BENCHMARKS.md) keep the results the stock paths give."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from app.serving import imaging, model_thread, render
from app.serving.cpu_kernels import OneDNNLinear, onednn_linear_works, prepare_cpu_kernels
from app.serving.engine import LocalEngine
from app.serving.registry import ModelEntry, ModelLoadError
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
        rec = ReconstructAnswer(entry, u8[i], r, seed=4)
        for name, want in (("original", x), ("reconstruction", out.reconstruction), ("paste", out.paste),
                           ("masked", out.masked)):  # fmt: skip
            ref = to_uint8(want[i]).permute(1, 2, 0).numpy()
            assert np.array_equal(render.view(rec, name), ref), name


def test_jpeg_draft_decoding_keeps_both_sides_at_least_the_model_size():
    buf = io.BytesIO()
    Image.fromarray(np.full((700, 1000, 3), 128, np.uint8)).save(buf, format="JPEG")
    assert imaging.decode(buf.getvalue(), 10**8).size == (1000, 700)
    assert imaging.decode(buf.getvalue(), 10**8, min_side=224).size == (500, 350)  # 1/2: 1/4 would be < 224


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


def _engine(cap: int, max_wait_ms: float, forward: model_thread.Forward) -> tuple[LocalEngine, ModelEntry]:
    torch.manual_seed(0)
    model = MAE(get_config("mae_test")).eval()
    entry = ModelEntry("t", model, "-", "random", "none", torch.device("cpu"), torch.float32)
    engine = LocalEngine(forward, max_batch_size=32, max_wait_ms=max_wait_ms, max_queue=64, cpu_max_batch_size=cap)
    return engine, entry


def test_cpu_batches_stop_at_the_cpu_cap_and_a_lone_request_does_not_wait():
    sizes: list[int] = []

    def spy(e, op, images, masking):
        sizes.append(int(images.shape[0]))
        return model_thread.forward(e, op, images, masking)

    async def scenario() -> None:
        engine, entry = _engine(cap=3, max_wait_ms=600_000, forward=spy)
        engine.start()
        x = np.zeros((32, 32, 3), np.uint8)
        # Nothing else is on its way: answered at once, not after max_wait (ten minutes; the timeout would end it)
        await asyncio.wait_for(engine.submit(entry, "embed", x, None), timeout=60)
        await asyncio.gather(*(engine.submit(entry, "embed", x, None) for _ in range(7)))
        await engine.close(1)

    asyncio.run(scenario())
    assert sizes[0] == 1 and max(sizes) <= 3 and sum(sizes[1:]) == 7


def test_engine_runs_on_the_one_model_thread():
    import threading

    names: set[str] = set()

    def spy(e, op, images, masking):
        names.add(threading.current_thread().name)
        return model_thread.forward(e, op, images, masking)

    async def scenario() -> None:
        engine, entry = _engine(cap=4, max_wait_ms=0, forward=spy)
        engine.start()
        await engine.submit(entry, "embed", np.zeros((32, 32, 3), np.uint8), None)
        model_thread.run(model_thread.compute, spy, entry, "embed", torch.zeros(1, 32, 32, 3, dtype=torch.uint8), None)
        await engine.close(1)

    asyncio.run(scenario())
    assert len(names) == 1 and next(iter(names)).startswith("mae-model")


@pytest.mark.parametrize("kernels", ["stock", "onednn", "onednn-packed", "auto"])
def test_compiled_stacks_answer_as_eager(weights, kernels):
    """MAE_COMPILE (torch.compile of the transformer stacks; inductor on this CPU): the same answers as eager, within
    fp32 rounding, whichever MAE_CPU_KERNELS is chosen (oneDNN's linear once broke inductor's lowering).
    reduce-overhead (CUDA graphs) needs a GPU and has not run here."""
    from app.settings import Settings
    from tests.serving import app_client, image_bytes

    png = image_bytes(48, 40)
    answers = {}
    for mode in ("off", "default"):
        with app_client(Settings(weights=str(weights), compile=mode, cpu_kernels=kernels, warmup=False)) as c:
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


class _LoopSteps(concurrent.futures.Executor):
    """An I/O pool that runs each job at once but answers it `steps[data]` event-loop steps later: every order of
    decodes finishing against the batcher's wake-ups, deterministically."""

    def __init__(self, loop: asyncio.AbstractEventLoop, steps: dict[bytes, int]) -> None:
        self.loop, self.steps = loop, steps

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        done: concurrent.futures.Future = concurrent.futures.Future()
        result = fn(*args, **kwargs)

        def later(n: int) -> None:
            if n:
                self.loop.call_soon(later, n - 1)
            else:
                done.set_result(result)

        later(self.steps[args[0]])
        return done


@pytest.mark.parametrize("steps", range(12))
def test_images_of_one_request_make_one_batch_whichever_is_decoded_last(monkeypatch, steps):
    """Failed before the fix for some `steps` (batches [3, 1]): the last image's `coming` ended, waking the batcher,
    before its submission was queued, so the partial batch of 3 left without it (CI: the OOM-split test, under load)."""
    from types import SimpleNamespace

    from app.serving import pipeline
    from app.settings import Settings

    sizes: list[int] = []

    def spy(e, op, images, masking):
        sizes.append(int(images.shape[0]))
        return model_thread.forward(e, op, images, masking)

    def prepare(data, c, mask, ops, resize, s):
        return np.zeros((c.img_size, c.img_size, 3), np.uint8), [None] * len(ops)

    monkeypatch.setattr(pipeline, "_prepare", prepare)

    async def scenario() -> None:
        engine, entry = _engine(cap=8, max_wait_ms=1000, forward=spy)
        engine.start()
        pool = _LoopSteps(asyncio.get_running_loop(), {b"0": 0, b"1": 0, b"2": 1, b"3": 1 + steps})
        service = SimpleNamespace(settings=Settings(), engine=engine, io_pool=pool)
        mask = pipeline.MaskSpec(ratio=0.0, seed=0)
        await pipeline.each_image(
            [b"0", b"1", b"2", b"3"],
            lambda b: pipeline.embed(service, entry, b, mask, "squash", None),  # type: ignore[arg-type]
        )
        await engine.close(1)

    asyncio.run(scenario())
    assert sizes == [4]


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
def test_a_failed_warm_up_names_the_setting_to_change(weights, error, compile_mode, names):
    """Start-up stops on a failed warm-up with one line that says where it failed and which MAE_* setting to change,
    not a bare exception class (a compile failure once left `InductorError: LoweringException: AssertionError:`)."""
    import torch._dynamo.exc

    from app.http.main import create_app
    from app.settings import Settings

    planted = error if error is not None else torch._dynamo.exc.TorchRuntimeError("lowering failed")
    failures: list[str] = []

    def forward(*_):  # type: ignore[no-untyped-def]
        raise planted

    settings = Settings(weights=str(weights), compile=compile_mode, warmup=True)
    app = create_app(settings, forward=forward, load_in_background=False, on_load_failure=failures.append)
    with pytest.raises(ModelLoadError), TestClient(app):
        pass
    assert len(failures) == 1 and "\n" not in failures[0], failures
    line = failures[0]
    assert line.startswith("warm-up failed on cpu/float32: ") and type(planted).__name__ in line, line
    assert all(n in line for n in names), line
