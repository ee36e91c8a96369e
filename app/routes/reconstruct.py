"""POST /v1/reconstruct: an image in, its MAE reconstruction out (PNG, or JSON with every view)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from app.deps import AppState, ready_state, require_api_key
from app.inputs import read_inputs
from app.pipeline import reconstruct_one
from app.routes.common import query_dict, request_body_doc, resolve, run_each
from app.schemas import APIError, ErrorBody, ImageFailure, ReconstructParams, ReconstructResult, parse_params

router = APIRouter(prefix="/v1", tags=["reconstruct"], dependencies=[Depends(require_api_key)])

_FIELDS = {
    "mask_ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.75},
    "seed": {"type": "integer", "minimum": 0},
    "mask": {"type": "string", "description": "masked patch indices, row-major, comma-separated"},
    "view": {"type": "string", "enum": ["paste", "reconstruction", "masked", "original", "grid", "error"]},
    "format": {"type": "string", "enum": ["png", "json"]},
    "model": {"type": "string"},
    "resize": {"type": "string", "enum": ["squash", "crop", "pad"]},
}


@router.post(
    "/reconstruct",
    summary="Reconstruct an image from a random (or given) subset of its patches",
    response_model=ReconstructResult | list[ReconstructResult | ImageFailure],
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "PNG (format=png) or JSON (format=json; a list when several images are sent)",
        },
        **{code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503, 504)},
    },
    openapi_extra=request_body_doc(_FIELDS),
)
async def reconstruct(
    request: Request,
    state: Annotated[AppState, Depends(ready_state)],
    mask_ratio: Annotated[float | None, Query(ge=0, lt=1, description="fraction of patches hidden")] = None,
    seed: Annotated[int | None, Query(ge=0, description="seeds the random mask; drawn and echoed when absent")] = None,
    mask: Annotated[str | None, Query(description="explicit masked patch indices; overrides ratio and seed")] = None,
    view: Annotated[str | None, Query(description="paste|reconstruction|masked|original|grid|error")] = None,
    format: Annotated[str | None, Query(description="png|json")] = None,
    model: Annotated[str | None, Query(description="model name, when several are loaded")] = None,
    resize: Annotated[str | None, Query(description="squash|crop|pad")] = None,
) -> Response:
    images, fields = await read_inputs(request, state.settings, state.io_pool)
    params = parse_params(ReconstructParams, query_dict(request), fields, state.registry.max_patches)
    entry, seed, deadline = resolve(state, request, params)
    if params.format == "png" and len(images) > 1:
        raise APIError(422, "bad_parameter", "format=png answers one image; use format=json for several")

    results = await run_each(images, lambda b: reconstruct_one(state, entry, params, b, seed, deadline))
    if params.format == "png":
        r = results[0]
        if isinstance(r, APIError):
            raise r
        meta = r["meta"]
        headers = {
            "X-MAE-Model": meta["model"],
            "X-MAE-Weights-SHA256": entry.sha256,
            "X-MAE-Seed": "" if meta["seed"] is None else str(meta["seed"]),
            "X-MAE-Mask-Ratio": f"{meta['mask_ratio']:.6g}",
            "X-MAE-Grid": f"{meta['grid'][0]}x{meta['grid'][1]}",
            "X-MAE-Mask": ",".join(map(str, meta["mask"])),
            "X-MAE-MSE": f"{meta['mse']:.6g}",
            "X-MAE-PSNR": "" if meta["psnr"] is None else f"{meta['psnr']:.4f}",
            "X-MAE-View": params.view,
        }
        return Response(r["png"], media_type="image/png", headers=headers)
    bodies = [r.body() if isinstance(r, APIError) else r for r in results]
    if len(images) == 1:
        if isinstance(results[0], APIError):
            raise results[0]
        return JSONResponse(bodies[0], headers={"X-MAE-Weights-SHA256": entry.sha256})
    return JSONResponse(bodies, headers={"X-MAE-Weights-SHA256": entry.sha256})
