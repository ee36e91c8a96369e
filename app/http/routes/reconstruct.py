"""POST /v1/reconstruct: an image in, its MAE reconstruction out (PNG, or JSON with every view)."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from app.http.auth import require_api_key
from app.http.errors import APIError, one_or_each, per_image
from app.http.headers import answer_headers
from app.http.jsonio import JSONAnswer
from app.http.params import ParsedRequest, ReconstructParams, call_for, openapi_for
from app.http.readiness import get_service
from app.http.schemas import ErrorBody, ImageFailure, ReconstructResult
from app.serving import pipeline, render
from app.serving.pipeline import ReconstructAnswer
from app.serving.service import Service

router = APIRouter(prefix="/v1", tags=["reconstruct"], dependencies=[Depends(require_api_key)])


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
    openapi_extra=openapi_for(ReconstructParams),
)
async def reconstruct(
    call: Annotated[ParsedRequest[ReconstructParams], Depends(call_for(ReconstructParams))],
    service: Annotated[Service, Depends(get_service)],
) -> Response:
    p = call.params
    if p.format == "png" and len(call.images) > 1:
        raise APIError(422, "bad_parameter", "format=png answers one image; use format=json for several")
    results = per_image(
        await pipeline.each_image(
            [pipeline.reconstruct(service, call.model, b, call.mask, p.resize, call.deadline) for b in call.images]
        ),
        service.settings.retry_after_s,
    )
    sha = {"X-MAE-Weights-SHA256": call.model.sha256}
    loop = asyncio.get_running_loop()
    if p.format == "png":
        r = results[0]
        if isinstance(r, APIError):
            raise r
        png = await loop.run_in_executor(service.io_pool, render.png, r, p.view)
        return Response(png, media_type="image/png", headers={**sha, **answer_headers(r, p.view)})

    async def body(x: ReconstructAnswer | APIError) -> dict[str, Any] | APIError:
        return x if isinstance(x, APIError) else await loop.run_in_executor(service.io_pool, _json, x)

    encoded = await asyncio.gather(*map(body, results))  # several images: their PNGs encode side by side
    return JSONAnswer(one_or_each(encoded, lambda d: d), headers=sha)


def _json(r: ReconstructAnswer) -> dict[str, Any]:
    """The JSON answer (ReconstructResult): every view as base64 PNG, the mask, masked-patch MSE and PSNR."""
    pngs = render.pngs(r)
    return {
        "model": r.model.name,
        "seed": r.seed,
        "mask_ratio": r.mask_ratio,
        "patch_size": r.patch_size,
        "grid": list(r.out.grid),
        "mask": r.mask_indices,
        "mse": r.out.mse,
        "psnr": r.out.psnr,
        "images": {k: base64.b64encode(pngs[k]).decode("ascii") for k in render.VIEWS},
    }
