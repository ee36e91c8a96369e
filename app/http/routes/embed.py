"""POST /v1/embed: an image in, the encoder's CLS / mean / per-patch embeddings out (JSON, npy or npz)."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Response

from app.http.auth import require_api_key
from app.http.errors import APIError, all_or_nothing, one_or_each, per_image
from app.http.headers import answer_headers
from app.http.jsonio import JSONAnswer
from app.http.params import EmbedParams, ParsedRequest, call_for, openapi_for
from app.http.readiness import get_service
from app.http.schemas import EmbedResult, ErrorBody, ImageFailure
from app.serving import pipeline
from app.serving.pipeline import EmbedAnswer
from app.serving.service import Service
from client.vocabulary import Pooling

router = APIRouter(prefix="/v1", tags=["embed"], dependencies=[Depends(require_api_key)])

_POOLS: dict[Pooling, tuple[str, ...]] = {
    "all": ("cls", "mean", "patches"),
    "cls": ("cls",),
    "mean": ("mean",),
    "patches": ("patches",),
}


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
    openapi_extra=openapi_for(EmbedParams),
)
async def embed(
    call: Annotated[ParsedRequest[EmbedParams], Depends(call_for(EmbedParams))],
    service: Annotated[Service, Depends(get_service)],
) -> Response:
    p = call.params
    has_cls = call.model.config.has_cls
    if p.pool == "cls":
        pipeline.require_cls(call.model)  # before any image is decoded or run
    results = per_image(
        await pipeline.each_image(
            [pipeline.embed(service, call.model, b, call.mask, p.resize, call.deadline) for b in call.images]
        ),
        service.settings.retry_after_s,
    )
    if p.format != "json":
        return _binary(all_or_nothing(results), p, has_cls)  # binary answers are all or nothing
    return JSONAnswer(one_or_each(results, lambda r: _json(r, p.pool)))


def _json(r: EmbedAnswer, pool: Pooling) -> dict[str, Any]:
    """The JSON answer (EmbedResult), with the embeddings `pool` asks for."""
    keep, e = _POOLS[pool], r.out
    body: dict[str, Any] = {
        "model": r.model.name,
        "dim": int(e.patches.shape[-1]),
        "grid": list(e.grid),
        "seed": r.seed,
        "mask_ratio": r.mask_ratio,
    }
    if "cls" in keep:
        body["cls"] = e.cls
    if "mean" in keep:
        body["mean"] = e.mean
    if "patches" in keep:
        body["patches"] = e.patches
        body["patch_indices"] = e.patch_indices
    return body


def _binary(results: list[EmbedAnswer], p: EmbedParams, has_cls: bool) -> Response:
    """npy: one array (pool cls|mean|patches), npz: named arrays. Several images stack on a leading axis."""
    dt = np.float16 if p.dtype == "float16" else np.float32
    single = len(results) == 1

    def stack(key: str) -> np.ndarray:
        arrs = [getattr(r.out, key) for r in results]
        return arrs[0] if single else np.stack(arrs)

    buf = io.BytesIO()
    if p.format == "npy":
        if p.pool == "all":
            raise APIError(
                422,
                "bad_parameter",
                "format=npy holds one array: choose pool=cls|mean|patches, or format=npz for all of them",
            )
        np.save(buf, stack(p.pool).astype(dt), allow_pickle=False)
        media, name = "application/x-npy", "embeddings.npy"
    else:
        arrays: dict[str, np.ndarray] = {}
        for key in _POOLS[p.pool]:
            if key == "cls" and not has_cls:
                continue
            arrays[key] = stack(key).astype(dt)
        if "patches" in arrays:
            arrays["patch_indices"] = stack("patch_indices").astype(np.int64)
        arrays["grid"] = np.asarray(results[0].out.grid, dtype=np.int64)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        media, name = "application/x-npz", "embeddings.npz"
    headers = {"Content-Disposition": f'attachment; filename="{name}"', **answer_headers(results[0])}
    return Response(buf.getvalue(), media_type=media, headers=headers)
