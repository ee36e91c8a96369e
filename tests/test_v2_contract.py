"""The v2 tensor contract (app/v2/contract.py): which outputs a model has, and which pass a request's outputs need."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.http.errors import APIError
from app.v2 import contract
from app.v2.contract import Requested

pytestmark = pytest.mark.unit


def entry(has_decoder: bool = True, has_cls: bool = True) -> SimpleNamespace:
    config = SimpleNamespace(embed_dim=8, num_patches=4, img_size=16, has_decoder=has_decoder, has_cls=has_cls)
    return SimpleNamespace(name="m", config=config)


def plan(names: list[str] | None, model: SimpleNamespace | None = None) -> contract.Plan:
    requested = None if names is None else [Requested(n, {}) for n in names]
    return contract.plan(model or entry(), requested, binary_default=False)


def test_the_outputs_decide_the_passes_and_the_default_ratio():
    assert (plan(None).outputs, plan(None).embed, plan(None).pixels) == (("cls", "mean", "patches"), True, False)
    assert plan(["patches", "patch_indices"]).default_ratio == 0.0
    p = plan(["paste", "mse"])
    assert (p.embed, p.pixels, p.default_ratio) == (False, True, 0.75)  # no encoder pass of its own
    p = plan(["cls", "paste"])
    assert (p.embed, p.pixels, p.outputs) == (True, True, ("cls", "paste"))  # both, in the order asked
    p = plan(["mask"])
    assert (p.embed, p.pixels, p.default_ratio) == (True, False, 0.0)  # the mask alone: the cheaper pass
    assert plan(["mask", "masked"]).embed is False


def test_a_model_without_a_decoder_or_a_cls_token_publishes_and_accepts_less():
    names = [t.name for t in contract.outputs(entry(has_decoder=False, has_cls=False))]
    assert names == ["mean", "patches", "patch_indices", "mask"]
    assert plan(None, entry(has_cls=False)).outputs == ("mean", "patches")  # the default skips what is not there
    with pytest.raises(APIError) as e:
        plan(["paste"], entry(has_decoder=False))
    assert e.value.status == 400 and "no pixel decoder" in e.value.message
    with pytest.raises(APIError):
        plan(["cls"], entry(has_cls=False))


def test_binary_flags_per_output():
    requested = [Requested("cls", {"binary_data": True}), Requested("mean", {})]
    p = contract.plan(entry(), requested, binary_default=False)
    assert p.binary == (True, False)
    assert contract.plan(entry(), None, binary_default=True).binary == (True, True, True)


def test_as_v2_maps_only_the_statuses_v2_lacks():
    for status, want in [(415, 400), (422, 400), (413, 413), (401, 401), (503, 503), (504, 504)]:
        e = contract.as_v2(APIError(status, "c", "m", {"Retry-After": "1"}))
        assert (e.status, e.message, e.headers) == (want, "m", {"Retry-After": "1"})
