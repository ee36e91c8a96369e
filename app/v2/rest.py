"""/v2 on the HTTP port: the Open Inference Protocol's REST routes, under /v1's API keys, limits and metrics.

    GET  /v2                                          server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live, /v2/health/ready            probes (no key; outside the concurrency limit)
    GET  /v2/models/{name}[/versions/{v}]             model metadata: the tensor contract (app/v2/contract.py)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer       JSON tensors, or the binary tensor extension both ways

Errors leave in the protocol's shape, {"error": "<message>"}: app/v2/errors.py's `V2ErrorShape` rewrites the
service's one error shape on /v2 paths (the statuses and headers stay, so Retry-After, WWW-Authenticate and the
metrics are /v1's). What gRPC shares with these routes (the server's name and version, `find`) is app/v2/contract.py's.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.http.auth import require_api_key
from app.http.errors import APIError, api_error
from app.http.params import deadline_of
from app.http.readiness import Readiness, get_service, readiness
from app.serving.errors import ServingError
from app.serving.registry import ModelEntry
from app.serving.service import Service
from app.v2 import contract, infer, schemas, tensors
from app.v2.errors import PREFIX

router = APIRouter(prefix=PREFIX, tags=["v2 (Open Inference Protocol)"])
_keyed = [Depends(require_api_key)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": schemas.Error} for code in codes}


def model_metadata(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "versions": [contract.VERSION],
        "platform": contract.PLATFORM,
        "inputs": [t.as_dict() for t in contract.inputs(entry)],
        "outputs": [t.as_dict() for t in contract.outputs(entry)],
    }


# ---------------------------------------------------------------------------------------------- server
@router.get("", summary="Server metadata", response_model=schemas.ServerMetadata, dependencies=_keyed,
            responses=_errors(401))  # fmt: skip
async def server_metadata() -> dict[str, Any]:
    return {"name": contract.SERVER, "version": contract.SERVER_VERSION, "extensions": contract.EXTENSIONS}


@router.get("/health/live", summary="Live: the process answers", response_model=schemas.Live)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Ready: models loaded and warm, not draining (503 otherwise)",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.Ready}},
)
async def ready(r: Annotated[Readiness, Depends(readiness)]) -> Response:
    if r.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "1"})


# ---------------------------------------------------------------------------------------------- models
@router.get("/models/{model_name}", summary="Model metadata: inputs and outputs with datatypes and shapes",
            response_model=schemas.ModelMetadata, dependencies=_keyed, responses=_errors(401, 404, 503))  # fmt: skip
@router.get("/models/{model_name}/versions/{model_version}", response_model=schemas.ModelMetadata,
            dependencies=_keyed, responses=_errors(401, 404, 503), summary="Model metadata (one version)")  # fmt: skip
async def metadata(
    service: Annotated[Service, Depends(get_service)], model_name: str, model_version: str | None = None
) -> dict[str, Any]:
    return model_metadata(contract.find(service, model_name, model_version))


@router.get("/models/{model_name}/ready", summary="Model ready", response_model=schemas.ModelReady,
            dependencies=_keyed, responses=_errors(401, 404, 503))  # fmt: skip
@router.get("/models/{model_name}/versions/{model_version}/ready", summary="Model ready (one version)",
            response_model=schemas.ModelReady, dependencies=_keyed, responses=_errors(401, 404, 503))  # fmt: skip
async def model_ready(
    service: Annotated[Service, Depends(get_service)], model_name: str, model_version: str | None = None
) -> dict[str, Any]:
    return {"name": contract.find(service, model_name, model_version).name, "ready": True}


_BINARY = {"type": "string", "format": "binary"}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": schemas.inline(schemas.InferRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": _BINARY,
                "description": f"binary tensor extension: the JSON header ({tensors.HEADER_LENGTH} bytes), then "
                "each input's binary_data_size bytes (BYTES: 4-byte little-endian length + bytes, per element)",
            },
        },
    },
}


@router.post("/models/{model_name}/infer", summary="Inference: images in, embeddings and reconstructions out",
             dependencies=_keyed, openapi_extra=_INFER_DOC, response_model=schemas.InferResponse,
             responses={200: {"content": {"application/octet-stream": {"schema": _BINARY}},
                              "description": "JSON, or with binary outputs the JSON header "
                                             f"({tensors.HEADER_LENGTH} bytes) and then the outputs' bytes"},
                        **_errors(400, 401, 404, 413, 503, 504)})  # fmt: skip
@router.post("/models/{model_name}/versions/{model_version}/infer", summary="Inference (one version)",
             dependencies=_keyed, openapi_extra=_INFER_DOC, response_model=schemas.InferResponse,
             responses={200: {"content": {"application/octet-stream": {"schema": _BINARY}}},
                        **_errors(400, 401, 404, 413, 503, 504)})  # fmt: skip
async def infer_route(
    request: Request,
    service: Annotated[Service, Depends(get_service)],
    model_name: str,
    model_version: str | None = None,
) -> Response:
    entry = contract.find(service, model_name, model_version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise APIError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported: send it plain")
    body = await request.body()
    loop = asyncio.get_running_loop()
    header_length, max_images = request.headers.get(tensors.HEADER_LENGTH), service.settings.max_images_per_request
    try:
        deadline = deadline_of(request)  # X-MAE-Deadline-Ms, as on /v1
        req = await loop.run_in_executor(service.io_pool, tensors.read_rest, body, header_length, max_images)
        if req.model_name not in (None, entry.name) or req.model_version not in (None, "", contract.VERSION):
            raise contract.bad("the body names another model or version than the URL")
        answer = await infer.infer(service, entry, req, deadline)
    except (APIError, ServingError) as e:
        raise contract.as_v2(api_error(e, service.settings.retry_after_s)) from None
    content, json_length = await loop.run_in_executor(service.io_pool, tensors.write_rest, answer, contract.VERSION)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={tensors.HEADER_LENGTH: str(json_length)})
