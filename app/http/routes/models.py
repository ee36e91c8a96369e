"""GET /v1/models: what is loaded, where from, on which device; the batch cap and request limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.http.auth import require_api_key
from app.http.readiness import get_service
from app.http.schemas import ErrorBody, ModelInfo, ModelList, ServerLimits
from app.serving import cpus, instances
from app.serving.service import Service

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "/models",
    response_model=ModelList,
    summary="The loaded models",
    responses={code: {"model": ErrorBody} for code in (401, 503)},
)
async def list_models(service: Annotated[Service, Depends(get_service)]) -> ModelList:
    registry, s = service.registry, service.settings
    models = [ModelInfo(**e.describe(), max_batch_size=service.engine.cap(e)) for e in registry.entries.values()]
    limits = ServerLimits(
        max_images_per_request=s.max_images_per_request, max_queue=s.max_queue, max_body_bytes=s.max_body_bytes
    )
    runtime = cpus.runtime_report()
    if instances.REPORT:  # this process runs the model (an HTTP worker's is the model process's)
        runtime = {**runtime, "model_instances": dict(instances.REPORT)}
    return ModelList(default=registry.default, models=models, limits=limits, runtime=runtime)
