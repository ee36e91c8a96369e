"""One image's path through the service: decode -> preprocess -> mask -> engine -> encode.

Decode and encode run in the I/O thread pool (Pillow releases the GIL); the model runs in the engine.
Each function returns a result dict or raises APIError, so a multi-image request can answer per image.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from app import imaging
from app.deps import AppState
from app.engine import ComputeFailed, DeadlineExceeded, Overloaded
from app.registry import ModelEntry
from app.schemas import VIEWS, APIError, EmbedParams, ReconstructParams
from model.mae import DecoderMissingError
from model.masking import Masking, explicit_masking, len_keep_for_ratio, random_noise

T = TypeVar("T")


async def _in_io_pool(state: AppState, fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(state.io_pool, fn)


def draw_seed() -> int:
    return secrets.randbelow(2**31)


def make_masking(entry: ModelEntry, params: ReconstructParams | EmbedParams, seed: int | None) -> Masking | None:
    """Explicit mask > seed + ratio. None means: encode every patch (embeddings at ratio 0)."""
    n = entry.config.num_patches
    if params.mask is not None:
        try:
            return explicit_masking(params.mask, n)
        except ValueError as e:
            raise APIError(422, "bad_mask", str(e)) from None
    if params.mask_ratio == 0 and isinstance(params, EmbedParams):
        return None
    assert seed is not None
    return Masking(random_noise(1, n, seed=seed), len_keep_for_ratio(n, params.mask_ratio))


async def _decode(state: AppState, data: bytes, size: int, resize: str) -> torch.Tensor:
    s = state.settings

    def work() -> torch.Tensor:
        # min_side: a large JPEG is decoded at a reduced DCT scale, never below the model's input size.
        im = imaging.decode(data, s.max_image_pixels, min_side=size, max_jpeg_scans=s.max_jpeg_scans)
        return imaging.preprocess(im, size, resize)  # type: ignore[arg-type]

    try:
        return await _in_io_pool(state, work)
    except imaging.ImageError as e:
        raise APIError(e.status, e.code, e.message) from None


async def _run(
    state: AppState, entry: ModelEntry, op: str, image: torch.Tensor, masking: Masking | None, deadline: float | None
) -> dict[str, Any]:
    assert state.engine is not None
    try:
        return await state.engine.submit(entry, op, image, masking, deadline)  # type: ignore[arg-type]
    except Overloaded as e:
        raise APIError(503, "overloaded", str(e), {"Retry-After": str(state.settings.retry_after_s)}) from None
    except DeadlineExceeded as e:
        raise APIError(504, "deadline_exceeded", str(e)) from None
    except DecoderMissingError as e:
        raise APIError(422, "no_decoder", str(e)) from None
    except ComputeFailed as e:
        raise APIError(500, "compute_failed", str(e)) from None


def _b64png(a: np.ndarray) -> str:
    return base64.b64encode(imaging.encode_png(a)).decode("ascii")


_PANELS = ("original", "masked", "reconstruction", "paste")


def render_view(entry: ModelEntry, original: torch.Tensor, out: dict[str, Any], view: str) -> np.ndarray:
    """One view as (H, W, 3) uint8; only what that view needs is computed (a PNG answer has one view)."""
    if view == "original":
        return imaging.to_uint8(original)
    if view in ("masked", "reconstruction", "paste"):
        return imaging.to_uint8(out[view])
    if view == "error":
        return imaging.error_heatmap(out["patch_error"], out["grid"], entry.config.patch_size)
    if view == "grid":
        return imaging.grid_view([render_view(entry, original, out, k) for k in _PANELS])
    raise ValueError(f"unknown view {view!r}")


def render_views(entry: ModelEntry, original: torch.Tensor, out: dict[str, Any]) -> dict[str, np.ndarray]:
    views = {k: render_view(entry, original, out, k) for k in (*_PANELS, "error")}
    views["grid"] = imaging.grid_view([views[k] for k in _PANELS])
    return views


async def reconstruct_one(
    state: AppState, entry: ModelEntry, params: ReconstructParams, data: bytes, seed: int | None, deadline: float | None
) -> dict[str, Any]:
    """-> {"png": bytes} for format=png, or the JSON result."""
    if not entry.config.has_decoder:
        raise APIError(422, "no_decoder", f"model {entry.name!r} has no pixel decoder: it can embed, not reconstruct")
    assert state.engine is not None
    with state.engine.coming():
        image = await _decode(state, data, entry.config.img_size, params.resize)
        masking = make_masking(entry, params, seed)
    out = await _run(state, entry, "reconstruct", image, masking, deadline)
    mask_idx = torch.nonzero(out["mask"], as_tuple=True)[0].tolist()
    meta = {
        "model": entry.name,
        "seed": None if params.mask is not None else seed,
        "mask_ratio": len(mask_idx) / entry.config.num_patches,
        "patch_size": entry.config.patch_size,
        "grid": list(out["grid"]),
        "mask": mask_idx,
        "mse": out["mse"],
        "psnr": imaging.psnr(out["mse"]),
    }
    if params.format == "png":

        def png() -> bytes:
            return imaging.encode_png(render_view(entry, image, out, params.view))

        return {"png": await _in_io_pool(state, png), "meta": meta}

    def all_views() -> dict[str, str]:
        views = render_views(entry, image, out)
        return {k: _b64png(views[k]) for k in VIEWS}

    return {**meta, "images": await _in_io_pool(state, all_views)}


async def embed_one(
    state: AppState, entry: ModelEntry, params: EmbedParams, data: bytes, seed: int | None, deadline: float | None
) -> dict[str, Any]:
    """-> tensors: cls (D) or None, mean (D), patches (K, D), patch_indices (K), grid."""
    assert state.engine is not None
    with state.engine.coming():
        image = await _decode(state, data, entry.config.img_size, params.resize)
        masking = make_masking(entry, params, seed)
    out = await _run(state, entry, "embed", image, masking, deadline)
    return {
        "model": entry.name,
        "dim": int(out["patches"].shape[-1]),
        "grid": list(out["grid"]),
        "seed": seed if masking is not None and params.mask is None else None,
        "mask_ratio": 1 - out["patches"].shape[0] / entry.config.num_patches,
        "cls": out["cls"],
        "mean": out["mean"],  # computed on the model thread, with the batch
        "patches": out["patches"],
        "patch_indices": out["patch_indices"],
    }
