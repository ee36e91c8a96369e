"""The v2 wire format: the REST body (JSON, or JSON plus binary tensor data), BYTES elements, and raw tensor bytes.

The binary tensor extension: the body is the JSON inference header, `Inference-Header-Content-Length` bytes long,
then each binary tensor's bytes in the order of the tensors that carry a `binary_data_size` parameter. A BYTES
tensor's bytes are its elements, each a 4-byte little-endian length and that many bytes (gRPC's raw contents are
the same). Every count and length here is checked against the bytes actually there before anything is sliced, so a
header or a prefix that lies is a 400 naming it, never a 5xx or a read past the end.

Runs in the I/O pool: nothing here touches torch or the event loop.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.http import jsonio
from app.v2 import contract, schemas
from app.v2.contract import Requested, Scalar, bad

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Request:
    """An inference request as both protocols carry it: the images, the parameters, the outputs asked for."""

    id: str | None
    model_name: str | None
    model_version: str | None
    parameters: dict[str, Scalar]
    images: list[bytes]
    outputs: list[Requested] | None


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray  # C-contiguous, of the datatype's numpy dtype
    binary: bool  # REST: as binary tensor data, not JSON

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The tensor's bytes, row-major, little-endian (the protocol's byte order)."""
        return np.ascontiguousarray(self.array, dtype=self.array.dtype.newbyteorder("<")).tobytes()


@dataclass(frozen=True)
class Response:
    model_name: str
    id: str | None
    parameters: dict[str, Scalar]
    outputs: list[Output]


# ---------------------------------------------------------------------------------------------- BYTES elements
def split_bytes(raw: bytes | memoryview, count: int, what: str) -> list[bytes]:
    """`count` length-prefixed elements that fill `raw` exactly."""
    view = memoryview(raw)
    out: list[bytes] = []
    at = 0
    for i in range(count):
        if at + 4 > len(view):
            raise bad(f"{what}: element {i} has no 4-byte length prefix: the data ends after {len(out)} of {count}")
        (n,) = _LENGTH.unpack_from(view, at)
        at += 4
        if n > len(view) - at:
            raise bad(f"{what}: element {i} says {n} bytes but only {len(view) - at} follow")
        out.append(bytes(view[at : at + n]))
        at += n
    if at != len(view):
        raise bad(f"{what}: {len(view) - at} bytes after the {count} elements of shape [{count}]")
    return out


def join_bytes(elements: list[bytes]) -> bytes:
    """The inverse of split_bytes (clients build BYTES tensors this way; tests and benchmarks use it)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


# ---------------------------------------------------------------------------------------------- REST requests
def read_rest(body: bytes, header_length: str | None, max_images: int) -> Request:
    """A REST request body (and its Inference-Header-Content-Length, if any) -> the request."""
    if header_length is None:
        header, rest = body, memoryview(b"")
    else:
        if not header_length.isascii() or not header_length.strip().isdigit():
            raise bad(f"{HEADER_LENGTH} must be a byte count, not {header_length[:40]!r}")
        n = int(header_length)
        if n > len(body):
            raise bad(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
        header, rest = body[:n], memoryview(body)[n:]
    try:
        parsed = schemas.InferRequest.model_validate_json(header)
    except ValidationError as e:
        raise bad(f"inference header: {_first_error(e)}") from None
    if len(parsed.inputs) != 1:
        raise bad(f"{len(parsed.inputs)} inputs: the model takes one, {contract.INPUT!r} (BYTES [-1])")
    tensor = parsed.inputs[0]
    count = contract.check_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    size: Any = None
    for key, value in tensor.parameters.items():
        if key != "binary_data_size":
            raise bad(f"input {tensor.name!r}: unsupported parameter {key!r} (only binary_data_size)")
        size = value
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {tensor.name!r}: binary_data_size must be a byte count")
        if tensor.data is not None:
            raise bad(f"input {tensor.name!r} has both binary_data_size and JSON data")
        if size != len(rest):
            where = "larger" if size > len(rest) else "smaller"
            why = f"binary_data_size {size} is {where} than the {len(rest)} bytes after the header"
            raise bad(f"input {tensor.name!r}: {why}")
        images = split_bytes(rest, count, f"input {tensor.name!r}")
    else:
        if len(rest):
            raise bad(f"{len(rest)} bytes after the inference header, but no input has binary_data_size")
        if tensor.data is None:
            raise bad(f"input {tensor.name!r} has neither JSON data nor binary_data_size")
        images = _base64_elements(tensor.data, count, tensor.name)
    outputs = None if parsed.outputs is None else [Requested(o.name, dict(o.parameters)) for o in parsed.outputs]
    return Request(parsed.id, parsed.model_name, parsed.model_version, dict(parsed.parameters), images, outputs)


def _base64_elements(data: list[Any], count: int, name: str) -> list[bytes]:
    """JSON BYTES elements: an image does not fit a JSON string, so each element is its base64 (as /v1's JSON)."""
    if len(data) != count:
        raise bad(f"input {name!r}: shape [{count}] but {len(data)} data elements")
    out = []
    for i, s in enumerate(data):
        if not isinstance(s, str):
            raise bad(f"input {name!r}: element {i} must be a base64 string, not {type(s).__name__}")
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"input {name!r}: element {i} is not valid base64 (or send binary data)") from None
    return out


def _first_error(e: ValidationError) -> str:
    first = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    if first.get("type") == "json_invalid":
        return f"not valid JSON ({first.get('ctx', {}).get('error', 'invalid')})"
    if first.get("type") == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {first.get('msg', 'invalid')}"


# ---------------------------------------------------------------------------------------------- REST responses
def write_rest(r: Response, model_version: str) -> tuple[bytes, int | None]:
    """The REST answer: JSON alone, or (some output binary) the JSON header and the binary data; returns the body and
    the header's length (None: the body is all JSON)."""
    outputs, chunks = [], []
    for o in r.outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": o.shape}
        if o.binary:
            raw = o.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = o.array.ravel()  # orjson writes numpy arrays as they are
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": r.model_name, "model_version": model_version}
    if r.id is not None:
        header["id"] = r.id
    header["parameters"] = r.parameters
    header["outputs"] = outputs
    head = jsonio.dumps(header)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
