"""The response bodies of /v1, as pydantic models: for OpenAPI (/docs) and for clients that want a schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="stable machine-readable code, e.g. too_many_pixels, unsupported_type")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


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
    runtime: dict[str, Any] | None = Field(
        None,
        description="the CPU (model, AVX2/AVX-512/AMX features) and the OpenMP wait policy chosen at start, and why",
    )
