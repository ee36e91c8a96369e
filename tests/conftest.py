"""Shared fixtures: tiny MAEs whose every parameter is random, so no check passes by zero biases or unit norms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from model.config import MAEConfig, get_config
from model.mae import MAE

if TYPE_CHECKING:
    from app.settings import Settings


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter (not the fixed position tables) with seeded noise of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # LayerNorm gains around 1
            elif p.ndim >= 2 and not name.endswith("token"):
                p.copy_(noise / p.shape[-1] ** 0.5 if p.ndim == 2 else noise * 0.05)
            else:
                p.copy_(0.1 * noise)
    return module


@pytest.fixture(scope="session")
def randomize() -> Callable[[nn.Module, int], nn.Module]:
    """randomize_ as a fixture, for test modules that build other models (e.g. Hugging Face's)."""
    return randomize_


@pytest.fixture
def make_mae() -> Callable[..., MAE]:
    """make_mae(config=None, seed=0, **changes): an eval-mode MAE (default: mae_test) with random weights."""

    def make(config: MAEConfig | None = None, seed: int = 0, **changes: object) -> MAE:
        config = (config or get_config("mae_test")).replace(**changes)
        torch.manual_seed(seed)
        return randomize_(MAE(config), seed).eval()

    return make


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """The tests' tiny model (mae_test config, seed 0) in the project's format: what most service tests serve."""
    from tests.serving import make_weights

    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def make_settings(weights: Path) -> Callable[..., Settings]:
    """make_settings(**overrides): the Settings of an in-process service (app_client, live_server, create_app) that
    serves the tests' tiny model (`weights`, or a module's own `weights` fixture); every other knob is its default
    (or its MAE_* variable). A test serving other weights passes weights=..., or builds its Settings itself."""
    from app.settings import Settings

    def make(**overrides: Any) -> Settings:
        return Settings(**{"weights": str(weights), **overrides})

    return make
