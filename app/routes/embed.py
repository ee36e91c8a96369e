"""POST /v1/embed: an image in, the encoder's CLS / mean / per-patch embeddings out (JSON, npy or npz)."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from app.deps import AppState, ready_state, require_api_key
from app.inputs import read_inputs
from app.pipeline import embed_one
from app.routes.common import query_dict, request_body_doc, resolve, run_each
from app.schemas import APIError, EmbedParams, EmbedResult, ErrorBody, ImageFailure, parse_params

router = APIRouter(prefix="/v1", tags=["embed"], dependencies=[Depends(require_api_key)])

_FIELDS = {
    "mask_ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0},
    "seed": {"type": "integer", "minimum": 0},
    "mask": {"type": "string", "description": "masked patch indices, row-major, comma-separated"},
    "pool": {"type": "string", "enum": ["all", "cls", "mean", "patches"]},
    "format": {"type": "string", "enum": ["json", "npy", "npz"]},
    "dtype": {"type": "string", "enum": ["float32", "float16"]},
    "model": {"type": "string"},
    "resize": {"type": "string", "enum": ["squash", "crop", "pad"]},
}
_POOLS = {"all": ("cls", "mean", "patches"), "cls": ("cls",), "mean": ("mean",), "patches": ("patches",)}


def _json_body(r: dict[str, Any], pool: str) -> dict[str, Any]:
    keep = _POOLS[pool]
    body = {k: r[k] for k in ("model", "dim", "grid", "seed", "mask_ratio")}
    if "cls" in keep:
        body["cls"] = None if r["cls"] is None else r["cls"].tolist()
    if "mean" in keep:
        body["mean"] = r["mean"].tolist()
    if "patches" in keep:
        body["patches"] = r["patches"].tolist()
        body["patch_indices"] = r["patch_indices"].tolist()
    return body


def _binary(results: list[dict[str, Any]], params: EmbedParams) -> Response:
    """npy: one array (pool cls|mean|patches), npz: named arrays. Several images stack on a leading axis."""
    dt = np.float16 if params.dtype == "float16" else np.float32
    single = len(results) == 1

    def stack(key: str) -> np.ndarray:
        arrs = [r[key].numpy() for r in results]
        return arrs[0] if single else np.stack(arrs)

    buf = io.BytesIO()
    if params.format == "npy":
        if params.pool == "all":
            raise APIError(
                422,
                "bad_parameter",
                "format=npy holds one array: choose pool=cls|mean|patches, or format=npz for all of them",
            )
        if params.pool == "cls" and results[0]["cls"] is None:
            raise APIError(422, "no_cls_token", "this model has no CLS token; use pool=mean")
        np.save(buf, stack(params.pool).astype(dt), allow_pickle=False)
        media, name = "application/x-npy", "embeddings.npy"
    else:
        arrays: dict[str, np.ndarray] = {}
        for key in _POOLS[params.pool]:
            if key == "cls" and results[0]["cls"] is None:
                continue
            arrays[key] = stack(key).astype(dt)
        if "patches" in arrays:
            arrays["patch_indices"] = stack("patch_indices").astype(np.int64)
        arrays["grid"] = np.asarray(results[0]["grid"], dtype=np.int64)
        np.savez(buf, **arrays)
        media, name = "application/x-npz", "embeddings.npz"
    r0 = results[0]
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-MAE-Model": r0["model"],
        "X-MAE-Dim": str(r0["dim"]),
        "X-MAE-Grid": f"{r0['grid'][0]}x{r0['grid'][1]}",
        "X-MAE-Seed": "" if r0["seed"] is None else str(r0["seed"]),
        "X-MAE-Mask-Ratio": f"{r0['mask_ratio']:.6g}",
    }
    return Response(buf.getvalue(), media_type=media, headers=headers)


@router.post(
    "/embed",
    summary="Encoder embeddings of an image: CLS, mean-pooled and per-patch",
    response_model=EmbedResult | list[EmbedResult | ImageFailure],
    responses={
        200: {
            "content": {
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "JSON (default), or numpy.load-able npy/npz",
        },
        **{code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503, 504)},
    },
    openapi_extra=request_body_doc(_FIELDS),
)
async def embed(
    request: Request,
    state: Annotated[AppState, Depends(ready_state)],
    mask_ratio: Annotated[float | None, Query(ge=0, lt=1, description="fraction of patches hidden; 0 = all")] = None,
    seed: Annotated[int | None, Query(ge=0, description="seeds the random mask when mask_ratio > 0")] = None,
    mask: Annotated[str | None, Query(description="explicit masked patch indices; overrides ratio and seed")] = None,
    pool: Annotated[str | None, Query(description="all|cls|mean|patches")] = None,
    format: Annotated[str | None, Query(description="json|npy|npz")] = None,
    dtype: Annotated[str | None, Query(description="float32|float16 (binary formats)")] = None,
    model: Annotated[str | None, Query(description="model name, when several are loaded")] = None,
    resize: Annotated[str | None, Query(description="squash|crop|pad")] = None,
) -> Response:
    images, fields = await read_inputs(request, state.settings, state.io_pool)
    params = parse_params(EmbedParams, query_dict(request), fields, state.registry.max_patches)
    entry, seed, deadline = resolve(state, request, params)
    results = await run_each(images, lambda b: embed_one(state, entry, params, b, seed, deadline))
    if params.format != "json":
        for r in results:  # binary answers are all or nothing
            if isinstance(r, APIError):
                raise r
        return _binary(results, params)
    if params.pool == "cls" and not isinstance(results[0], APIError) and results[0]["cls"] is None:
        raise APIError(422, "no_cls_token", "this model has no CLS token; use pool=mean")
    bodies = [r.body() if isinstance(r, APIError) else _json_body(r, params.pool) for r in results]
    if len(images) == 1:
        if isinstance(results[0], APIError):
            raise results[0]
        return JSONResponse(bodies[0])
    return JSONResponse(bodies)
