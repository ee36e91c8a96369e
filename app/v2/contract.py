"""The tensor contract of the v2 front-end: one input, named outputs with fixed datatypes and shapes, request
parameters, and the work a request's outputs ask for. REST and gRPC share it (and the server's metadata, and `find`,
the model a request names); model metadata publishes it.

Input `image`: BYTES [-1], one encoded PNG, JPEG or WebP per element, decoded and limited exactly as /v1's images.
Outputs, for N images, embedding width D, L patches of which L' are visible, and the model's H x W input:

    cls, mean                      FP32 [N, D]        the encoder's CLS token / mean of the patch tokens (final norm)
    patches                        FP32 [N, L', D]    the visible patch tokens, raster order
    patch_indices                  INT64 [N, L']      which patches those are
    mask                           UINT8 [N, L]       1 = masked
    reconstruction, paste, masked  UINT8 [N, H, W, 3] /v1/reconstruct's views
    mse                            FP32 [N]           mean squared error over the masked patches, pixels in [0, 1]

The requested outputs decide the work: embedding outputs alone run the encoder (as /v1/embed; mask_ratio defaults
to 0), any pixel output runs encoder and decoder (as /v1/reconstruct; default 0.75). Asking for both runs both
passes, on the same mask. No `outputs` at all means cls, mean and patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from app.http.errors import APIError
from app.http.params import MaskParams, parse
from app.serving.errors import UnknownModel
from app.serving.registry import ModelEntry
from app.serving.service import Service
from model.masking import EMBED_MASK_RATIO, RECONSTRUCT_MASK_RATIO

INPUT = "image"
EMBEDDING = ("cls", "mean", "patches", "patch_indices")
PIXELS = ("reconstruction", "paste", "masked", "mse")
DEFAULT = ("cls", "mean", "patches")
VERSION = "1"  # every model has one version; /versions/1 names it, and so does an empty version
PLATFORM = "pytorch"
SERVER, SERVER_VERSION = "mae-serve", "0.1.0"  # server metadata, REST's GET /v2 and gRPC's ServerMetadata
EXTENSIONS = ["binary_tensor_data"]

Scalar = bool | int | float | str  # what a v2 parameter value can be


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def find(service: Service, name: str, version: str | None = None) -> ModelEntry:
    """The model a v2 request names (the names of /v1/models); 404 for another name or version."""
    try:
        entry = service.model(name)
    except UnknownModel as e:
        raise APIError(404, e.code, str(e)) from None
    if version not in (None, "", VERSION):
        why = f"model {name!r} has no version {version!r}; it has {VERSION!r}"
        raise APIError(404, "unknown_version", why)
    return entry


def inputs(entry: ModelEntry) -> list[TensorInfo]:
    return [TensorInfo(INPUT, "BYTES", [-1])]


def outputs(entry: ModelEntry) -> list[TensorInfo]:
    """What this model can answer (model metadata). -1: the request decides (images, visible patches)."""
    c = entry.config
    d, n, size = c.embed_dim, c.num_patches, c.img_size
    out = [TensorInfo("cls", "FP32", [-1, d])] if entry.config.has_cls else []
    out += [
        TensorInfo("mean", "FP32", [-1, d]),
        TensorInfo("patches", "FP32", [-1, -1, d]),
        TensorInfo("patch_indices", "INT64", [-1, -1]),
        TensorInfo("mask", "UINT8", [-1, n]),
    ]
    if c.has_decoder:
        out += [TensorInfo(name, "UINT8", [-1, size, size, 3]) for name in PIXELS[:3]]
        out.append(TensorInfo("mse", "FP32", [-1]))
    return out


def bad(message: str) -> APIError:
    return APIError(400, "bad_tensor", message)


def as_v2(e: APIError) -> APIError:
    """The v2 status of an answer, applied once where it leaves (rest.infer_route, grpc._rpc): v2 has no 415 or
    422 (an undecodable element or a bad parameter is a bad request, as Triton answers it); the message stays."""
    if e.status in (415, 422):
        return APIError(400, e.code, e.message, e.headers)
    return e


# ---------------------------------------------------------------------------------------------- parameters
class Params(MaskParams):
    """The request parameters (`parameters` of the request, in REST and gRPC alike). mask_ratio, seed, mask and
    resize are /v1's own fields and checks."""

    mask_ratio: float | None = Field(  # type: ignore[assignment]
        None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="fraction of patches hidden; default 0 for embedding outputs alone, 0.75 with a pixel output",
    )
    dtype: Literal["FP32", "FP16"] = Field("FP32", description="datatype of the cls, mean and patches outputs")
    binary_data_output: bool = Field(False, description="REST: every output as binary data unless it says otherwise")
    timeout: int | None = Field(
        None, gt=0, le=3_600_000_000, description="microseconds the request may wait for the model (Triton's timeout)"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _no_model(cls, v: object) -> None:
        raise ValueError("the model is named by the URL (gRPC: model_name), not by a parameter")


def parse_params(values: dict[str, Scalar], max_param_bytes: int, max_patches: int) -> Params:
    return parse(Params, {}, dict(values), max_patches, max_param_bytes)  # sized before parsing, as /v1's


# ---------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class Requested:
    """One entry of a request's `outputs`."""

    name: str
    parameters: dict[str, Scalar]


@dataclass(frozen=True)
class Plan:
    outputs: tuple[str, ...]  # in the order asked
    binary: tuple[bool, ...]  # REST: each output as binary data (the binary tensor extension) or JSON
    embed: bool  # the encoder pass of /v1/embed
    pixels: bool  # the encoder + decoder pass of /v1/reconstruct

    @property
    def default_ratio(self) -> float:
        return RECONSTRUCT_MASK_RATIO if self.pixels else EMBED_MASK_RATIO


def plan(entry: ModelEntry, requested: list[Requested] | None, binary_default: bool) -> Plan:
    """Check the requested outputs against the model and decide the passes."""
    known = {t.name for t in outputs(entry)}
    if requested is None:
        names = tuple(n for n in DEFAULT if n in known)
        binary = (binary_default,) * len(names)
    else:
        if not requested:
            raise bad("'outputs' is empty: name at least one output, or leave 'outputs' out for cls, mean, patches")
        flags = []
        for r in requested:
            if r.name not in known:
                why = " (it has no pixel decoder)" if r.name in PIXELS else ""
                has = ", ".join(sorted(known))
                raise bad(f"unknown output {r.name!r} for model {entry.name!r}{why}; it has: {has}")
            flag = binary_default
            for key, value in r.parameters.items():
                if key != "binary_data" or not isinstance(value, bool):
                    raise bad(f"output {r.name!r}: unsupported parameter {key!r} (only binary_data: true|false)")
                flag = value
            flags.append(flag)
        names = tuple(r.name for r in requested)
        if len(set(names)) != len(names):
            raise bad("an output is requested twice")
        binary = tuple(flags)
    pixels = any(n in PIXELS for n in names)
    embed = any(n in EMBEDDING for n in names) or not pixels  # `mask` alone: the encoder pass is the cheaper
    return Plan(names, binary, embed, pixels)


def check_input(name: str, datatype: str, shape: list[int], max_images: int) -> int:
    """The one input's header -> its element count (images)."""
    if name != INPUT:
        raise bad(f"unknown input {name!r}: the model takes one input, {INPUT!r} (BYTES [-1], encoded images)")
    if datatype != "BYTES":
        raise bad(f"input {INPUT!r} must be BYTES (one encoded PNG, JPEG or WebP per element), not {datatype!r}")
    if len(shape) != 1 or shape[0] < 0:
        raise bad(f"input {INPUT!r} must have shape [N] (N images), not {shape}")
    n = shape[0]
    if n == 0:
        raise bad(f"input {INPUT!r} has no element: send at least one image")
    if n > max_images:
        raise APIError(413, "too_many_images", f"{n} images in one request; the limit is {max_images}")
    return n
