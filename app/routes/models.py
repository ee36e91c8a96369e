"""GET /v1/models: what is loaded, where from, on which device."""

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
    assert state.registry is not None
    return ModelList.model_validate(
        {"default": state.registry.default, "models": [e.describe() for e in state.registry.entries.values()]}
    )
