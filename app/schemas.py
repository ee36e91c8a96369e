"""Request parameters, response bodies and the one error shape.

Parameters arrive as query parameters, form fields or JSON fields; they are merged (the same name given twice
with different values is an error) and validated here, so routes only see clean values.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

View = Literal["paste", "reconstruction", "masked", "original", "grid", "error"]
VIEWS: tuple[str, ...] = ("paste", "reconstruction", "masked", "original", "grid", "error")
MAX_SEED = 2**63 - 1
_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


class APIError(Exception):
    """Any error answer. Leaves the service as {"error": {"status", "code", "message"}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="stable machine-readable code, e.g. too_many_pixels, unsupported_type")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _parse_mask(v: Any) -> list[int] | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        # ASCII digits only: int() alone would also take "1_0" and non-ASCII (e.g. Arabic-Indic) digits.
        if not all(_INDEX.fullmatch(p) for p in parts):
            raise ValueError("mask must be comma-separated integers (masked patch indices, row-major)")
        return [int(p) for p in parts]
    if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return v
    raise ValueError("mask must be a list of integers or a comma-separated string")


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mask_ratio: float
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    mask: list[int] | None = None
    model: str | None = Field(None, max_length=200)
    resize: Literal["squash", "crop", "pad"] = "squash"

    @field_validator("mask_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not math.isfinite(v) or not 0.0 <= v < 1.0:
            raise ValueError("mask_ratio must be a number with 0 <= mask_ratio < 1")
        return v

    @field_validator("mask", mode="before")
    @classmethod
    def _mask(cls, v: Any) -> list[int] | None:
        return _parse_mask(v)


class ReconstructParams(_Common):
    mask_ratio: float = 0.75
    view: View = "paste"
    format: Literal["png", "json"] = "png"


class EmbedParams(_Common):
    mask_ratio: float = 0.0
    pool: Literal["all", "cls", "mean", "patches"] = "all"
    format: Literal["json", "npy", "npz"] = "json"
    dtype: Literal["float32", "float16"] = "float32"


def merge_params(query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    merged = dict(body)
    for k, v in query.items():
        if k in merged and str(merged[k]) != v:
            raise APIError(422, "bad_parameter", f"parameter {k!r} given twice with different values")
        merged.setdefault(k, v)
    return merged


def parse_params(cls: type[_Common], query: dict[str, str], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(merge_params(query, body))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown parameter"
        raise APIError(422, "bad_parameter", f"{where}: {msg}") from None


# ---------------------------------------------------------------- response bodies (for OpenAPI and clients)
class ReconstructResult(BaseModel):
    model: str
    seed: int | None = Field(description="the seed that drew the mask; null for an explicit mask")
    mask_ratio: float = Field(description="the fraction of patches actually masked")
    patch_size: int
    grid: list[int] = Field(description="[rows, cols] of the patch grid")
    mask: list[int] = Field(description="masked patch indices, row-major")
    images: dict[str, str] = Field(description="view -> base64 PNG, for every view")
    mse: float = Field(description="mean squared error over masked patches, pixels in [0, 1]")
    psnr: float | None = Field(description="PSNR in dB over masked patches; null when nothing is masked")


class EmbedResult(BaseModel):
    model: str
    dim: int
    grid: list[int]
    seed: int | None = None
    mask_ratio: float
    cls: list[float] | None = Field(None, description="CLS token after the final norm (pool all|cls)")
    mean: list[float] | None = Field(None, description="mean of the patch tokens (pool all|mean)")
    patches: list[list[float]] | None = Field(None, description="patch tokens, raster order (pool all|patches)")
    patch_indices: list[int] | None = Field(None, description="which patches `patches` are: all, or the visible")


class ImageFailure(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    family: str
    architecture: str
    image_size: int
    patch_size: int
    grid: list[int]
    num_patches: int
    embed_dim: int
    depth: int | None
    decoder_embed_dim: int | None
    decoder_depth: int | None
    parameters: int
    norm_pix_loss: bool
    has_decoder: bool
    weights_path: str
    weights_format: str
    weights_sha256: str
    random_init: bool
    device: str
    dtype: str
    max_batch_size: int | None = Field(None, description="the largest batch the engine forms for this model")


class ServerLimits(BaseModel):
    """What a client needs to keep the batches full without tripping a limit (e.g. `mae-client embed-dataset`)."""

    max_images_per_request: int
    max_queue: int = Field(description="images waiting for the model; beyond this: 503 Retry-After")
    max_body_bytes: int


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    limits: ServerLimits | None = None
