"""POST /v1/embeddings: OpenAI's embeddings API for images, a third front-end over app.serving.pipeline.

Its images join /v1's and /v2's in the same engine batches, under the same API keys (app.http.auth), body and
concurrency limits (app.http.middleware), deadline header, cancellation and metrics. The numbers are /v1/embed's:
the same `pipeline.embed`, pooled as `pool=cls|mean` there.

Choices (README "OpenAI-compatible embeddings"):
- `pooling` defaults to cls where the model has a CLS token (the MAE paper's linear probe reads it, and it is
  `mae-client embed-dataset`'s default), else mean;
- `dimensions` only equal to the model's width: MAE features are not Matryoshka-trained, so a truncated vector is
  not a smaller embedding of the same image;
- `usage.prompt_tokens` counts the image patches the encoder saw;
- an unknown model is 404 (OpenAI's answer, so the SDKs raise NotFoundError; /v1 says 422);
- one bad image fails the whole request (OpenAI's API has no per-item errors), with /v1's status for it.
Errors leave in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: app/openai/errors.py's
`OpenAIErrorShape` rewrites the service's one shape on this path, so statuses and headers (Retry-After,
WWW-Authenticate) stay /v1's; `OpenAIError` names the field at fault.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from app.http.auth import require_api_key
from app.http.errors import APIError, all_or_nothing, api_error, from_validation, per_image
from app.http.jsonio import JSONAnswer
from app.http.params import deadline_of, draw_seed
from app.http.readiness import get_service
from app.openai import fetch
from app.openai.errors import OpenAIError
from app.openai.schemas import EmbeddingsRequest, EmbeddingsResponse, ErrorBody
from app.serving import pipeline
from app.serving.errors import ServingError, UnknownModel
from app.serving.pipeline import EmbedAnswer, MaskSpec
from app.serving.service import Service
from app.settings import Settings
from app.v2.schemas import inline

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(require_api_key)])


_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline(EmbeddingsRequest.model_json_schema())}},
    }
}


@router.post(
    "/embeddings",
    summary="OpenAI-compatible embeddings of images (the official SDKs' client.embeddings.create)",
    response_model=EmbeddingsResponse,
    responses={code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 415, 422, 503, 504)},
    openapi_extra=_DOC,
)
async def embeddings(request: Request, service: Annotated[Service, Depends(get_service)]) -> Response:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise OpenAIError(415, "unsupported_type", f"send application/json, not {ctype or 'no Content-Type'}", None)
    s = service.settings
    deadline = deadline_of(request)
    body = await request.body()
    policy = _policy(s.url_fetch_hosts, s.url_fetch_max_bytes, s.url_fetch_timeout_s, s.url_fetch_max_redirects)
    loop = asyncio.get_running_loop()
    req, items = await loop.run_in_executor(
        service.io_pool, read, body, s.max_images_per_request, s.max_param_bytes, policy is not None
    )
    try:
        entry = service.model(req.model)
    except UnknownModel as e:
        raise OpenAIError(404, e.code, str(e), "model") from None
    width = entry.config.embed_dim
    if req.dimensions is not None and req.dimensions != width:
        why = (
            f"dimensions={req.dimensions}: model {entry.name!r} gives {width}-dimensional embeddings, and MAE features "
            "are not Matryoshka-trained: a truncated vector would not be a shorter embedding of the same image. "
            f"Omit dimensions or send {width}"
        )
        raise OpenAIError(422, "bad_parameter", why, "dimensions")
    pooling = req.pooling or ("cls" if entry.config.has_cls else "mean")
    if pooling == "cls":
        try:
            pipeline.require_cls(entry)
        except ServingError as e:
            raise OpenAIError.of(api_error(e, s.retry_after_s), "pooling") from None
    mask = MaskSpec(req.mask_ratio, req.seed if req.seed is not None else draw_seed())

    images: list[bytes] = [b for b in items if isinstance(b, bytes)]
    if len(images) < len(items):  # URLs, fetched side by side (policy is set: read() refused them otherwise)
        assert policy is not None
        got = await asyncio.gather(
            *(fetch.fetch(x, policy) if isinstance(x, str) else _given(x) for x in items), return_exceptions=True
        )
        images = _all_or_first_error(per_image(got, s.retry_after_s))

    answers = [pipeline.embed(service, entry, data, mask, req.resize, deadline) for data in images]
    results = _all_or_first_error(per_image(await pipeline.each_image(answers), s.retry_after_s))
    return _answer(results, pooling, req.encoding_format, entry.name)


async def _given(b: bytes) -> bytes:
    return b


def _all_or_first_error(results: list[Any]) -> list[Any]:
    """OpenAI's API has no per-item errors: the first refused image is the answer, naming its index."""
    try:
        return all_or_nothing(results, label="input[{i}]")
    except APIError as e:
        raise OpenAIError.of(e, "input") from None


def _answer(results: list[EmbedAnswer], pooling: str, encoding: str, model: str) -> Response:
    data, tokens = [], 0
    for i, r in enumerate(results):
        v = r.out.cls if pooling == "cls" else r.out.mean
        assert v is not None  # require_cls ran
        emb: Any = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if encoding == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens += int(r.out.patches.shape[0])
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    seed = results[0].seed
    return JSONAnswer(body, headers={} if seed is None else {"X-MAE-Seed": str(seed)})


@functools.lru_cache(maxsize=8)
def _policy(hosts: str, max_bytes: int, timeout_s: float, max_redirects: int) -> fetch.Policy | None:
    return fetch.Policy.from_settings(
        Settings.model_construct(url_fetch_hosts=hosts, url_fetch_max_bytes=max_bytes,
                                 url_fetch_timeout_s=timeout_s, url_fetch_max_redirects=max_redirects)
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- the body
def read(raw: bytes, max_images: int, max_param_bytes: int, urls: bool) -> tuple[EmbeddingsRequest, list[bytes | str]]:
    """In the I/O pool: the JSON body -> the request and each input as image bytes, or a URL to fetch."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # also nesting past 1024 levels
        raise OpenAIError(400, "bad_json", f"the body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "bad_json", "the JSON body must be an object", None)
    inputs = body.get("input")
    if isinstance(inputs, list) and len(inputs) > max_images:  # counted before any item is looked at
        why = f"{len(inputs)} images in one request; the limit is {max_images}"
        raise OpenAIError(413, "too_many_images", why, "input")
    for key, value in body.items():
        if key != "input" and isinstance(value, str) and len(value) > max_param_bytes:
            raise OpenAIError(413, "parameter_too_large", f"parameter {key!r} is over {max_param_bytes} bytes", key)
    try:
        req = EmbeddingsRequest.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        loc = errors[0].get("loc", ()) if errors else ()
        raise OpenAIError.of(from_validation(errors), str(loc[0]) if loc else None) from None
    if req.modality != "image":
        why = f"modality {req.modality!r} is not served: a Masked Autoencoder embeds images only (send modality=image)"
        raise OpenAIError(422, "bad_parameter", why, "modality")
    if not req.input:
        raise OpenAIError(400, "no_image", "input is empty: send at least one image", "input")
    return req, [_item(i, s, urls, len(req.input) > 1) for i, s in enumerate(req.input)]


def _item(i: int, s: str, urls: bool, many: bool) -> bytes | str:
    where = f"input[{i}]" if many else "input"
    head = s[:8].lower()
    if head.startswith(("http://", "https://")):
        if not urls:
            why = f"{where}: image URLs are off on this server (MAE_URL_FETCH_HOSTS); send a data:image/...;base64 URI"
            raise OpenAIError(400, "url_input_disabled", why, "input")
        return s
    if head.startswith("data:"):
        header, comma, payload = s[5:].partition(",")
        if not comma or len(header) > 200:
            raise OpenAIError(400, "bad_data_uri", f"{where}: not a data URI (data:image/png;base64,...)", "input")
        media, *opts = (p.strip().lower() for p in header.split(";"))
        if media and not media.startswith("image/"):
            why = f"{where}: a data URI of type {media!r}; send an image (data:image/png|jpeg|webp;base64,...)"
            raise OpenAIError(415, "unsupported_type", why, "input")
        if "base64" not in opts:
            raise OpenAIError(400, "bad_data_uri", f"{where}: a data URI must be base64 (;base64,)", "input")
        s = payload
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        why = f"{where} is not an image: neither a data:image/...;base64 URI nor base64 (text is not embedded here)"
        raise OpenAIError(400, "bad_base64", why, "input") from None
