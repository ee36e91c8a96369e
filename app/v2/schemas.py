"""The REST protocol's JSON bodies (KServe v2 / Open Inference Protocol), as pydantic models.

The request models parse the inference header (strict types: a string where a number belongs is an error, not a
guess); every model documents its route in /docs. Binary tensor data is outside the JSON: app/v2/tensors.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Value = StrictBool | StrictInt | StrictFloat | StrictStr
NAME = 256  # longest tensor or parameter name we read
MAX_PARAMETERS = 64
MAX_TENSORS = 64
MAX_RANK = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    name: str = Field(max_length=NAME, description="'image'")
    shape: list[StrictInt] = Field(max_length=MAX_RANK, description="[N]: N images")
    datatype: str = Field(max_length=NAME, description="'BYTES'")
    parameters: dict[str, Value] = Field(
        default_factory=dict, max_length=MAX_PARAMETERS, description="binary_data_size: the element bytes follow"
    )
    data: list[Any] | None = Field(
        None, description="in JSON: one base64 string per image (or send them as binary data, binary_data_size)"
    )


class RequestOutput(_Strict):
    name: str = Field(max_length=NAME)
    parameters: dict[str, Value] = Field(
        default_factory=dict, max_length=MAX_PARAMETERS, description="binary_data: true for binary tensor data"
    )


class InferRequest(_Strict):
    id: str | None = Field(None, max_length=NAME)
    model_name: str | None = Field(None, max_length=NAME, description="optional; the URL's model when given")
    model_version: str | None = Field(None, max_length=NAME)
    parameters: dict[str, Value] = Field(
        default_factory=dict,
        max_length=MAX_PARAMETERS,
        description="mask_ratio, seed, mask, resize, dtype, binary_data_output, timeout (README)",
    )
    inputs: list[RequestInput] = Field(max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_TENSORS)


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Value] | None = Field(None, description="binary_data_size when the data follows the JSON")
    data: list[Any] | None = Field(None, description="row-major, flattened (absent for binary data)")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Value] = Field(description="seed (when a random mask was drawn) and the mask_ratio used")
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class Error(BaseModel):
    error: str


def inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs inlined (they do not recur), for a route's openapi_extra."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
