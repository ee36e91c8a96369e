"""One v2 inference request: its images through serving.pipeline (the same decode, masks and engine queues as /v1, so a
v2 image and a /v1 image with the same key share a forward pass), then the requested outputs as arrays."""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

import numpy as np

from app.http.errors import all_or_nothing, per_image
from app.http.params import draw_seed
from app.serving import pipeline, render
from app.serving.errors import ServingError
from app.serving.pipeline import EmbedAnswer, MaskSpec, ReconstructAnswer
from app.serving.registry import ModelEntry
from app.serving.service import Service
from app.v2 import contract
from app.v2.contract import Plan, Scalar
from app.v2.tensors import Output, Request, Response

T = TypeVar("T")
_VIEWS: dict[str, render.View] = {"reconstruction": "reconstruction", "paste": "paste", "masked": "masked"}


async def infer(service: Service, entry: ModelEntry, req: Request, deadline: float | None) -> Response:
    s = service.settings
    p = contract.parse_params(req.parameters, s.max_param_bytes, service.registry.max_patches)
    plan = contract.plan(entry, req.outputs, p.binary_data_output)
    ratio = p.mask_ratio if p.mask_ratio is not None else plan.default_ratio
    mask = MaskSpec(ratio=ratio, seed=p.seed if p.seed is not None else draw_seed(), indices=p.mask)
    if p.timeout is not None:
        until = time.monotonic() + p.timeout / 1e6
        deadline = until if deadline is None else min(deadline, until)

    retry = service.settings.retry_after_s
    recons: list[ReconstructAnswer] = []
    embeds: list[EmbedAnswer] = []
    if plan.pixels and plan.embed:  # both passes: one decode per image, its two submissions side by side
        pairs = _all_or_error(await pipeline.each_image(
            [pipeline.reconstruct_and_embed(service, entry, b, mask, p.resize, deadline) for b in req.images]
        ), retry)  # fmt: skip
        recons, embeds = [r for r, _ in pairs], [e for _, e in pairs]
    elif plan.pixels:
        recons = _all_or_error(await pipeline.each_image(
            [pipeline.reconstruct(service, entry, b, mask, p.resize, deadline) for b in req.images]
        ), retry)  # fmt: skip
    else:
        embeds = _all_or_error(await pipeline.each_image(
            [pipeline.embed(service, entry, b, mask, p.resize, deadline) for b in req.images]
        ), retry)  # fmt: skip
    outputs = await asyncio.get_running_loop().run_in_executor(
        service.io_pool, assemble, plan, embeds, recons, p.dtype == "FP16", entry.config.num_patches
    )
    first = recons[0] if recons else embeds[0]
    parameters: dict[str, Scalar] = {"mask_ratio": first.mask_ratio}
    if first.seed is not None:
        parameters["seed"] = first.seed
    return Response(entry.name, req.id, parameters, outputs)


def _all_or_error(results: list[T | ServingError], retry_after_s: int) -> list[T]:
    """A v2 answer has no per-image errors: the first image that failed fails the request, and says which it was."""
    return all_or_nothing(per_image(results, retry_after_s))


def assemble(
    plan: Plan, embeds: list[EmbedAnswer], recons: list[ReconstructAnswer], fp16: bool, num_patches: int
) -> list[Output]:
    """The requested outputs, stacked over the images (the I/O pool: numpy only)."""
    floats = np.float16 if fp16 else np.float32

    def stack(arrays: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
        return np.ascontiguousarray(np.stack(arrays).astype(dtype, copy=False))

    out = []
    for name, binary in zip(plan.outputs, plan.binary, strict=True):
        if name in ("cls", "mean", "patches"):
            arrays = [getattr(e.out, name) for e in embeds]
            out.append(Output(name, "FP16" if fp16 else "FP32", stack(arrays, floats), binary))
        elif name == "patch_indices":
            out.append(Output(name, "INT64", stack([e.out.patch_indices for e in embeds], np.int64), binary))
        elif name == "mask":
            if recons:
                masks = [r.out.mask for r in recons]
            else:  # the encoder pass: every patch not among the visible ones is masked
                masks = []
                for e in embeds:
                    m = np.ones(num_patches, dtype=np.uint8)
                    m[e.out.patch_indices] = 0
                    masks.append(m)
            out.append(Output(name, "UINT8", stack(masks, np.uint8), binary))
        elif name == "mse":
            out.append(Output(name, "FP32", np.asarray([r.out.mse for r in recons], dtype=np.float32), binary))
        else:  # reconstruction, paste, masked: /v1's PNG views, drawn by the same code
            views = [render.view(r, _VIEWS[name]) for r in recons]
            out.append(Output(name, "UINT8", stack(views, np.uint8), binary))
    return out
