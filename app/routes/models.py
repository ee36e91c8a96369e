"""GET /v1/models: what is loaded, where from, on which device; the batch cap and request limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.deps import AppState, ready_state, require_api_key
from app.schemas import ErrorBody, ModelList

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "/models",
    response_model=ModelList,
    summary="The loaded models",
    responses={code: {"model": ErrorBody} for code in (401, 503)},
)
async def list_models(state: Annotated[AppState, Depends(ready_state)]) -> ModelList:
    assert state.registry is not None and state.engine is not None
    s = state.settings
    models = [{**e.describe(), "max_batch_size": state.engine.cap(e)} for e in state.registry.entries.values()]
    limits = {"max_images_per_request": s.max_images_per_request, "max_queue": s.max_queue,
              "max_body_bytes": s.max_body_bytes}  # fmt: skip
    return ModelList.model_validate({"default": state.registry.default, "models": models, "limits": limits})
