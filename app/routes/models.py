"""GET /v1/models: what is loaded, where from, on which device."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.auth import require_api_key
from app.schemas import ErrorBody, ModelList
from app.service import Service, get_service

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "/models",
    response_model=ModelList,
    summary="The loaded models",
    responses={code: {"model": ErrorBody} for code in (401, 503)},
)
async def list_models(service: Annotated[Service, Depends(get_service)]) -> ModelList:
    registry = service.registry
    return ModelList(default=registry.default, models=[e.describe() for e in registry.entries.values()])
