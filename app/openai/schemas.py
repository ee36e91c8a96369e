"""The bodies of POST /v1/embeddings: OpenAI's embeddings request (with Infinity's `modality`) and answer, the MAE
options as extra fields, and OpenAI's error shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.http.params import MAX_SEED
from client.vocabulary import ResizeMode
from model.masking import EMBED_MASK_RATIO


def _inputs(v: Any) -> Any:
    """One string or a list of strings; token arrays (OpenAI's other input forms) are text, refused plainly."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    if isinstance(v, list) and v and all(isinstance(s, int | list) for s in v):
        raise ValueError("token arrays are text; this server embeds images: send data:image/...;base64 URIs")
    raise ValueError("input must be a string or a list of strings (data:image/...;base64 URIs or base64)")


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200, description="a model of GET /v1/models")
    input: Annotated[list[str], BeforeValidator(_inputs)] = Field(
        description="an image, or a list of them: data:image/...;base64 URIs, bare base64, or http(s) URLs when "
        "MAE_URL_FETCH_HOSTS allows them",
        json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes (what OpenAI's SDKs ask for)"
    )
    modality: Literal["image", "text"] = Field("image", description="Infinity's field; only image is served")
    dimensions: int | None = Field(None, ge=1, description="accepted only equal to the model's width")
    user: str | None = Field(None, max_length=1000, description="accepted and ignored")
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="cls | mean; default: cls where the model has a CLS token (as the paper probes), else mean"
    )
    mask_ratio: float = Field(
        EMBED_MASK_RATIO, ge=0, lt=1, allow_inf_nan=False, description="fraction of patches hidden; 0 = all"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seeds the random mask (mask_ratio > 0)")
    resize: ResizeMode = Field("squash", description="squash (the official demo) | crop (centre square) | pad")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="image patches the encoder saw (visible patches, CLS not counted)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error or server_error")
    param: str | None = Field(description="the request field at fault, where one is")
    code: str | None = Field(description="the reason, as /v1's error code")


class ErrorBody(BaseModel):
    error: ErrorDetail
