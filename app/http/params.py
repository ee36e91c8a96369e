"""The parameters of each /v1 operation, declared once.

One pydantic model per operation (`ReconstructParams`, `EmbedParams`) is the contract: `call_for(Model)` is the
FastAPI dependency that reads the request (any of the three input forms), merges the query string with the form or
JSON fields, validates once, and resolves the model, the seed and the deadline; `openapi_for(Model)` generates the
route's OpenAPI (query parameters and the three request bodies) from the same model.
"""

from __future__ import annotations

import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema

from app.http.errors import APIError, from_validation
from app.http.inputs import read_inputs
from app.http.readiness import get_service
from app.serving.pipeline import MaskSpec
from app.serving.registry import ModelEntry
from app.serving.render import View
from app.serving.service import Service
from client.vocabulary import EmbedDtype, Pooling, ResizeMode
from model.masking import EMBED_MASK_RATIO, RECONSTRUCT_MASK_RATIO

MAX_SEED = 2**63 - 1
DEADLINE_HEADER = "X-MAE-Deadline-Ms"
_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


_seeds = random.Random(secrets.randbits(64))  # seeds need not be secret, only independent: no syscall per request


def draw_seed() -> int:
    return _seeds.getrandbits(31)


def _parse_mask(v: Any, info: ValidationInfo) -> list[int] | None:
    """A mask string or list -> indices. A mask that names more patches than the largest loaded model has (the
    validation context's `max_patches`) is refused from its length, before it is split: it cannot be valid."""
    max_patches = (info.context or {}).get("max_patches")
    if v is None or v == "":
        return None
    too_many = f"mask names more patches than the model has ({max_patches}); at least one stays visible"
    if isinstance(v, str):
        if max_patches is not None and v.count(",") >= max_patches:
            raise ValueError(too_many)
        parts = [p.strip() for p in v.split(",") if p.strip()]
        # ASCII digits only: int() alone would also take "1_0" and non-ASCII (e.g. Arabic-Indic) digits.
        if not all(_INDEX.fullmatch(p) for p in parts):
            raise ValueError("mask must be comma-separated integers (masked patch indices, row-major)")
        return [int(p) for p in parts]
    if isinstance(v, list):
        if max_patches is not None and len(v) >= max_patches:
            raise ValueError(too_many)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            return v
    raise ValueError("mask must be a list of integers or a comma-separated string")


Mask = Annotated[
    list[int] | None,
    BeforeValidator(_parse_mask),
    WithJsonSchema(
        {
            "type": "string",
            "description": "masked patch indices, row-major, comma-separated (or a JSON "
            "list); overrides mask_ratio and seed",
        }
    ),  # fmt: skip
]


class MaskParams(BaseModel):
    """What every operation takes: which patches to hide, which model, how to fit the image."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(ge=0, lt=1, allow_inf_nan=False, description="fraction of patches hidden")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seeds the random mask; drawn and echoed when absent")
    mask: Mask = None
    model: str | None = Field(None, max_length=200, description="model name, when several are loaded")
    resize: ResizeMode = Field("squash", description="squash (the official demo) | crop (centre square) | pad")

    def mask_spec(self, seed: int) -> MaskSpec:
        return MaskSpec(ratio=self.mask_ratio, seed=seed, indices=self.mask)


class ReconstructParams(MaskParams):
    mask_ratio: float = Field(
        RECONSTRUCT_MASK_RATIO, ge=0, lt=1, allow_inf_nan=False, description="fraction of patches hidden"
    )
    view: View = Field("paste", description="the PNG answer's view")
    format: Literal["png", "json"] = Field("png", description="png: one view; json: every view, the mask and PSNR")


class EmbedParams(MaskParams):
    mask_ratio: float = Field(
        EMBED_MASK_RATIO, ge=0, lt=1, allow_inf_nan=False, description="fraction of patches hidden; 0 = all"
    )
    pool: Pooling = Field("all", description="which embeddings")
    format: Literal["json", "npy", "npz"] = Field("json", description="json, or numpy.load-able npy / npz")
    dtype: EmbedDtype = Field("float32", description="of the binary formats")


P = TypeVar("P", bound=MaskParams)


@dataclass(frozen=True)
class ParsedRequest(Generic[P]):
    """One validated /v1 call: its parameters, its images (bytes, not yet decoded) and what they resolve to."""

    params: P
    images: list[bytes]
    model: ModelEntry
    seed: int  # the request's seed, or one drawn for it
    mask: MaskSpec  # which patches to hide: the params' explicit mask, or their ratio drawn from `seed`
    deadline: float | None  # time.monotonic() past which the client no longer wants the answer


def call_for(cls: type[P]) -> Callable[..., Awaitable[ParsedRequest[P]]]:
    """The FastAPI dependency that turns a request into a `ParsedRequest[cls]`."""

    async def dependency(request: Request, service: Annotated[Service, Depends(get_service)]) -> ParsedRequest[P]:
        images, fields = await read_inputs(request, service.settings, service.io_pool)
        s = service.settings
        params = parse(cls, _query(request), fields, service.registry.max_patches, s.max_param_bytes)
        seed = params.seed if params.seed is not None else draw_seed()
        model = service.model(params.model)
        return ParsedRequest(params, images, model, seed, params.mask_spec(seed), deadline_of(request))

    return dependency


def parse(
    cls: type[P],
    query: dict[str, str],
    fields: dict[str, Any],
    max_patches: int | None = None,
    max_param_bytes: int | None = None,
) -> P:
    """Query + form/JSON fields -> the operation's parameters (the same name twice, differently, is an error).
    A string value over `max_param_bytes` is refused before anything parses it (a mask is split by validation); a
    list is checked by its length against the model's patch count before any item is looked at."""
    if max_param_bytes is not None:
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > max_param_bytes:
                raise APIError(413, "parameter_too_large", f"parameter {key!r} is over {max_param_bytes} bytes")
    merged = dict(fields)
    for k, v in query.items():
        if k in merged and str(merged[k]) != v:
            raise APIError(422, "bad_parameter", f"parameter {k!r} given twice with different values")
        merged.setdefault(k, v)
    try:
        return cls.model_validate(merged, context={"max_patches": max_patches})
    except ValidationError as e:
        raise from_validation(e.errors()) from None


def _query(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        if k in out:
            raise APIError(422, "bad_parameter", f"query parameter {k!r} given more than once")
        out[k] = v
    return out


def deadline_of(request: Request) -> float | None:
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not (0 < ms <= 3_600_000):
        raise APIError(422, "bad_parameter", f"{DEADLINE_HEADER} must be milliseconds in (0, 3600000]")
    return time.monotonic() + ms / 1000.0


def _given(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's schema as a query or form value: given or absent, never null."""
    branches = prop.get("anyOf")
    if not branches:
        return prop
    values = [b for b in branches if b.get("type") != "null"]
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**values[0], **rest} if len(values) == 1 else {**rest, "anyOf": values}


def openapi_for(cls: type[MaskParams]) -> dict[str, Any]:
    """OpenAPI of a route taking `cls`: each field as a query parameter and as a form / JSON field, the image as a
    multipart file, a raw image body or base64 JSON, and the deadline header. Generated: never a second list."""
    schema = cls.model_json_schema()
    props: dict[str, Any] = {name: _given(prop) for name, prop in schema["properties"].items()}
    binary = {"type": "string", "format": "binary"}
    parameters = [
        {"name": name, "in": "query", "required": False, "schema": prop, "description": prop.get("description", "")}
        for name, prop in props.items()
    ]
    parameters.append(
        {
            "name": DEADLINE_HEADER,
            "in": "header",
            "required": False,
            "description": "queueing budget in ms: a request still waiting for the model after it gets 504",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3_600_000},
        }
    )
    components = {"$defs": schema["$defs"]} if "$defs" in schema else {}
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "array", "items": binary, "minItems": 1}, **props},
                        "required": ["image"],
                        **components,
                    },
                    "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp"}},
                },
                "image/png": {"schema": binary},
                "image/jpeg": {"schema": binary},
                "image/webp": {"schema": binary},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "string", "description": "base64 PNG/JPEG/WebP"},
                            "images": {"type": "array", "items": {"type": "string"}},
                            **props,
                        },
                        **components,
                    }
                },
            },
        },
    }
