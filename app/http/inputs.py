"""Read a request into (image bytes, body fields), whichever of the three input forms it uses.

- multipart/form-data: one or more `image` file fields, parameters as other fields;
- a raw body with Content-Type image/png, image/jpeg or image/webp;
- application/json: {"image": "<base64>"} or {"images": ["<base64>", ...]} plus parameter fields.
The body size cap is enforced while reading by `BodyGuard` (app/http/middleware.py), so nothing here can be
made to buffer more than `max_body_bytes`. Form fields are bounded by the multipart parser (`max_param_bytes`),
JSON fields by app.http.params.parse before anything parses them, and a JSON body is parsed and its images
base64-decoded in the I/O pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from concurrent.futures import Executor
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from app.http.errors import APIError
from app.settings import Settings

RAW_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}


async def read_inputs(
    request: Request, settings: Settings, pool: Executor | None = None
) -> tuple[list[bytes], dict[str, Any]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_images_per_request
    if ctype == "multipart/form-data":
        images, fields = await _read_multipart(request, settings)
    elif ctype in RAW_IMAGE_TYPES:
        images, fields = [await request.body()], {}
    elif ctype == "application/json":
        body = await request.body()
        images, fields = await asyncio.get_running_loop().run_in_executor(pool, _parse_json, body)
    elif not ctype:
        raise APIError(
            415,
            "missing_content_type",
            "missing Content-Type: send multipart/form-data, image/png|jpeg|webp or application/json",
        )
    else:
        raise APIError(
            415,
            "unsupported_type",
            f"unsupported Content-Type {ctype!r}: send multipart/form-data, image/png|jpeg|webp or application/json",
        )
    if not images:
        raise APIError(
            400,
            "no_image",
            "no image in the request (multipart field 'image', a raw image body, or JSON 'image'/'images')",
        )
    if len(images) > limit:
        raise APIError(413, "too_many_images", f"{len(images)} images in one request; the limit is {limit}")
    return images, fields


async def _read_multipart(request: Request, settings: Settings) -> tuple[list[bytes], dict[str, Any]]:
    try:
        form = await request.form(
            max_files=settings.max_images_per_request + 1,
            max_fields=64,
            max_part_size=settings.max_param_bytes,  # non-file fields only; files are spooled
        )
    except (APIError, ClientDisconnect):
        raise
    except Exception as e:  # malformed multipart, a limit reached (Starlette: an HTTPException 400 with the reason)
        why = str(getattr(e, "detail", e)).lower()
        if "too many files" in why:  # Starlette stopped at max_files: the documented 413, not a 400
            limit = settings.max_images_per_request
            raise APIError(413, "too_many_images", f"more than {limit} images in one request") from None
        if "exceeded maximum size" in why:  # a non-file field over max_part_size
            why = f"a form field is over {settings.max_param_bytes} bytes"
            raise APIError(413, "parameter_too_large", why) from None
        raise APIError(400, "bad_multipart", f"cannot parse the multipart body: {e}") from None
    try:
        images: list[bytes] = []
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise APIError(422, "bad_parameter", f"unexpected file field {key!r}; images go in 'image'")
                images.append(await value.read())
            elif key == "image":
                raise APIError(422, "bad_parameter", "the 'image' field must be a file upload")
            elif key in fields:
                raise APIError(422, "bad_parameter", f"form field {key!r} given more than once")
            else:
                fields[key] = value
        return images, fields
    finally:
        await form.close()


def _parse_json(raw_body: bytes) -> tuple[list[bytes], dict[str, Any]]:
    """Runs in the I/O pool: JSON -> (images, parameter fields)."""
    try:
        body = json.loads(raw_body)
    except RecursionError:  # deeply nested arrays/objects: the decoder recurses once per level
        raise APIError(400, "bad_json", "the JSON body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers over Python's 4300-digit limit
        raise APIError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "bad_json", "the JSON body must be an object")
    if "image" in body and "images" in body:
        raise APIError(422, "bad_parameter", "give either 'image' or 'images', not both")
    raw = body.pop("images", None)
    if raw is None:
        single = body.pop("image", None)
        raw = [] if single is None else [single]
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise APIError(422, "bad_parameter", "'images' must be a list of base64 strings")
    images = []
    for i, s in enumerate(raw):
        if s.startswith("data:") and "," in s:  # accept data URLs, as browsers make them
            s = s.split(",", 1)[1]
        try:
            images.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise APIError(400, "bad_base64", f"image {i} is not valid base64") from None
    return images, body
