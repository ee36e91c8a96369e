"""Hostile input to the v2 body parser (REST's JSON and binary tensor extension, gRPC's ModelInferRequest): every
malformed request gets a clear 4xx in the v2 shape (gRPC: INVALID_ARGUMENT or RESOURCE_EXHAUSTED), never a 5xx,
a hang or a read past the end. The style of tests/test_hostile_inputs.py: each case names the answer it must get.
"""

from __future__ import annotations

import collections
import json
import struct

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from app.http.errors import APIError
from app.http.main import create_app
from app.v2 import tensors
from app.v2.tensors import HEADER_LENGTH, join_bytes
from tests.harness import ServerProcess, free_port
from tests.serving import image_bytes

PNG = image_bytes(48, 40)
SEEN: collections.Counter = collections.Counter()
INFER = "/v2/models/tiny/infer"


def header(images: int = 1, size: int | None = None, **changes) -> dict:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [images]}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    body = {"inputs": [tensor], "outputs": [{"name": "cls"}]}
    for key, value in changes.items():
        if key.startswith("input_"):
            tensor[key.removeprefix("input_")] = value
        else:
            body[key] = value
    return body


def binary(head: dict | bytes, raw: bytes, length: int | str | None = None) -> tuple[bytes, dict[str, bytes]]:
    h = head if isinstance(head, bytes) else json.dumps(head).encode()
    return h + raw, {HEADER_LENGTH: str(len(h) if length is None else length).encode()}


@pytest.fixture(scope="module")
def client(make_settings):
    s = make_settings(max_wait_ms=0, max_images_per_request=4, max_body_bytes=2 * 1024 * 1024,
                 max_param_bytes=1024)  # fmt: skip
    with TestClient(create_app(s, load_in_background=False), raise_server_exceptions=False) as c:
        yield c
    print(f"\nv2 hostile inputs: {sum(SEEN.values())} requests, statuses {dict(sorted(SEEN.items()))}")
    assert not [s for s in SEEN if s >= 500]


def answered(r: httpx.Response, status: int, part: str = "") -> None:
    SEEN[r.status_code] += 1
    assert r.status_code == status, (r.status_code, r.text[:300])
    if status >= 400:
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and part in body["error"], body


RAW = join_bytes([PNG])


@pytest.mark.integration
def test_malformed_rest_headers_get_a_clear_400(client):
    ok_body, ok_headers = binary(header(size=len(RAW)), RAW)
    answered(client.post(INFER, content=ok_body, headers=ok_headers), 200)
    cases = [  # (body, headers, status, part of the message)
        (*binary(header(size=len(RAW), input_datatype="FP32"), RAW), 400, "must be BYTES"),
        (*binary(header(size=len(RAW), input_shape=[1, 1]), RAW), 400, "must have shape [N]"),
        (*binary(header(size=len(RAW), input_shape=[-1]), RAW), 400, "must have shape [N]"),
        (*binary(header(size=len(RAW), input_shape=[2]), RAW), 400, "has no 4-byte length prefix"),
        (*binary(header(size=len(RAW), input_shape=[10**12]), RAW), 413, "the limit is 4"),
        (*binary(header(size=len(RAW), input_shape=[0]), RAW), 400, "no element"),
        (*binary(header(size=len(RAW), input_shape=["1"]), RAW), 400, "shape.0"),
        (*binary(header(size=len(RAW), input_name="pixels"), RAW), 400, "unknown input 'pixels'"),
        (*binary(header(size=len(RAW) + 1), RAW), 400, "is larger than the"),  # binary_data_size past the body
        (*binary(header(size=10**15), RAW), 400, "is larger than the"),
        (*binary(header(size=len(RAW) - 1), RAW), 400, "is smaller than the"),
        (*binary(header(size=-1), RAW), 400, "byte count"),
        (*binary(header(size=len(RAW)), struct.pack("<I", 2**32 - 1) + PNG), 400, "says 4294967295 bytes"),
        (*binary(header(size=len(RAW)), struct.pack("<I", len(PNG) + 1) + PNG), 400, "only"),  # prefix overruns
        (*binary(header(size=3), b"\x01\x00\x00"), 400, "no 4-byte length prefix"),
        (*binary(header(size=len(RAW) + 2), RAW + b"\0\0"), 400, "bytes after the 1 elements"),
        (*binary(header(size=len(RAW)), RAW, length=10**9), 400, "the body has only"),  # header past the body
        (*binary(header(size=len(RAW)), RAW, length=-5), 400, "must be a byte count"),
        (*binary(header(size=len(RAW)), RAW, length="12abc"), 400, "must be a byte count"),
        (*binary(header(size=len(RAW)), RAW, length="١٢"), 400, "must be a byte count"),  # non-ASCII digits
        (*binary(header(size=len(RAW)), RAW, length=0), 400, "not valid JSON"),
        (*binary(header(size=len(RAW)), RAW, length=10), 400, "not valid JSON"),  # cut inside the JSON
        (*binary(header(), RAW), 400, "no input has binary_data_size"),
        (*binary(header(size=len(RAW), input_data=["eA=="]), RAW), 400, "both binary_data_size and JSON data"),
        (*binary(header(size=len(RAW), input_parameters={"binary_data_size": len(RAW), "x": 1}), RAW), 400,
         "unsupported parameter 'x'"),
        (*binary(header(size=len(RAW), model_name="other"), RAW), 400, "another model"),
        (*binary(header(size=len(RAW), inputs=[]), RAW), 400, "0 inputs"),
        (*binary(header(size=len(RAW), outputs=[]), RAW), 400, "'outputs' is empty"),
        (*binary(header(size=len(RAW), outputs=[{"name": "cls"}, {"name": "cls"}]), RAW), 400, "twice"),
        (*binary(header(size=len(RAW), outputs=[{"name": "cls", "parameters": {"classification": 3}}]), RAW), 400,
         "unsupported parameter 'classification'"),
        (*binary(header(size=len(RAW), outputs=[{"name": "cls", "parameters": {"binary_data": "yes"}}]), RAW), 400,
         "only binary_data: true|false"),
        (*binary(header(size=len(RAW), extra=1), RAW), 400, "extra: unknown field"),
        (*binary(header(size=len(RAW), parameters={"mask_ratio": "lots"}), RAW), 400, "mask_ratio"),
        (*binary(header(size=len(RAW), parameters={"mask_ratio": float("nan")}), RAW), 400, ""),
        (*binary(header(size=len(RAW), parameters={"seed": -1}), RAW), 400, "seed"),
        (*binary(header(size=len(RAW), parameters={"mask": "1," * 2000}), RAW), 413, "over 1024 bytes"),
        (*binary(header(size=len(RAW), parameters={"mask": "a,b"}), RAW), 400, "comma-separated integers"),
        (*binary(header(size=len(RAW), parameters={"mask": list(range(3))}), RAW), 400, "parameters.mask"),
        (*binary(header(size=len(RAW), parameters={"resize": "stretch"}), RAW), 400, "resize"),
        (*binary(header(size=len(RAW), parameters={"dtype": "BF16"}), RAW), 400, "dtype"),
        (*binary(header(size=len(RAW), parameters={"model": "tiny"}), RAW), 400, "named by the URL"),
        (*binary(header(size=len(RAW), parameters={"timeout": 0}), RAW), 400, "timeout"),
        (*binary(b"[" * 100_000, b"", length=100_000), 400, "inference header"),  # nested far past any limit
        (*binary(b'{"inputs": [' + b"{}," * 70 + b"{}]}", b""), 400, "inputs"),  # more tensors than the cap
        (json.dumps(header(input_data=["not base64!"])).encode(), {}, 400, "not valid base64"),
        (json.dumps(header(input_data=[1])).encode(), {}, 400, "must be a base64 string"),
        (json.dumps(header(input_data=[[PNG.hex()]])).encode(), {}, 400, "must be a base64 string"),
        (json.dumps(header(images=2, input_data=["eA=="])).encode(), {}, 400, "but 1 data elements"),
        (json.dumps(header()).encode(), {}, 400, "neither JSON data nor binary_data_size"),
        (b"", {}, 400, "not valid JSON"),
        (b"\xff\xfe", {}, 400, "not valid JSON"),
        (b'"just a string"', {}, 400, "inference header"),
        (ok_body, {**ok_headers, "Content-Encoding": b"gzip"}, 415, "Content-Encoding 'gzip'"),
        (ok_body, {**ok_headers, "X-MAE-Deadline-Ms": b"soon"}, 400, "X-MAE-Deadline-Ms"),
    ]  # fmt: skip
    for body, headers, status, part in cases:
        answered(client.post(INFER, content=body, headers=headers), status, part)


@pytest.mark.integration
def test_bad_images_inside_tensors_are_400_or_413_like_v1(client):
    jpeg = bytearray(image_bytes(16, 16, fmt="JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # a bomb: refused from the header
    for element, status, part in [(b"", 400, "the image is empty"), (b"junk", 400, "unsupported image type"),
                                  (PNG[:40], 400, ""), (bytes(jpeg), 413, "image is 60000x60000")]:  # fmt: skip
        body, headers = binary(header(images=2, size=len(join_bytes([PNG, element]))), join_bytes([PNG, element]))
        answered(client.post(INFER, content=body, headers=headers), status, "image 1: " + part)


# ------------------------------------------------------------------------------------------------ fuzzing
VALID_HEAD = json.dumps(header(size=len(RAW))).encode()


@pytest.mark.unit
@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=600), st.one_of(st.none(), st.integers(-5, 700).map(str), st.text(max_size=8)))
def test_the_parser_answers_any_bytes_with_a_request_or_a_4xx(body, length):
    try:
        tensors.read_rest(body, length, 4)
    except APIError as e:
        assert 400 <= e.status < 500 and e.message


@pytest.mark.unit
@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.data())
def test_mutated_valid_bodies_parse_or_get_a_4xx(data):
    """A valid binary body with bytes flipped, inserted or cut anywhere, and its header length off by a little."""
    body = bytearray(VALID_HEAD + RAW)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        kind = data.draw(st.sampled_from(["flip", "insert", "cut"]))
        if kind == "flip":
            body[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del body[at : at + data.draw(st.integers(1, 16))]
    length = len(VALID_HEAD) + data.draw(st.integers(-8, 8))
    try:
        req = tensors.read_rest(bytes(body), str(length), 4)
    except APIError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert len(req.images) == 1  # it parsed: then it is one image's bytes, whatever they became


@pytest.mark.unit
@settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.integers(0, 6))
def test_bytes_elements_never_read_past_the_end(raw, count):
    try:
        out = tensors.split_bytes(raw, count, "x")
    except APIError as e:
        assert e.status == 400
    else:
        assert len(out) == count and join_bytes(out) == raw


# ------------------------------------------------------------------------------------------------ gRPC
@pytest.fixture(scope="module")
def grpc_address(weights):
    port = free_port()
    env = {"MAE_WEIGHTS": str(weights), "MAE_DEVICE": "cpu", "MAE_WARMUP": "false", "MAE_GRPC_PORT": str(port),
           "MAE_MAX_IMAGES_PER_REQUEST": "4"}  # fmt: skip
    with ServerProcess(env):
        yield f"127.0.0.1:{port}"


def infer_raw(address: str, message: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        try:
            call(message, timeout=30)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


def infer_request(**changes) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    req = pb.ModelInferRequest(model_name="tiny", inputs=[tensor], raw_input_contents=[RAW])
    for key, value in changes.items():
        if key.startswith("input_"):
            target, key = req.inputs[0], key.removeprefix("input_")
        else:
            target = req
        if key == "contents":
            target.contents.CopyFrom(value)
        else:
            target.ClearField(key)
            getattr(target, key).extend(value) if isinstance(value, list) else setattr(target, key, value)
    return req


@pytest.mark.integration
def test_malformed_grpc_requests_get_invalid_argument(grpc_address):
    invalid, too_big = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert infer_raw(grpc_address, infer_request().SerializeToString()) == (grpc.StatusCode.OK, "")
    param = pb.ModelInferRequest(parameters={"seed": pb.InferParameter()})  # a parameter with no value
    typed = pb.InferTensorContents(fp32_contents=[1.0])
    cases = [
        (b"\xff\xff\xff\xff", invalid, "not a ModelInferRequest"),
        (b"\x0a\xff\xff\xff\xff\x0f", invalid, "not a ModelInferRequest"),  # a length prefix past the end
        (infer_request(input_datatype="UINT8"), invalid, "must be BYTES"),
        (infer_request(input_shape=[2]), invalid, "no 4-byte length prefix"),
        (infer_request(input_shape=[9]), too_big, "the limit is 4"),
        (infer_request(raw_input_contents=[struct.pack("<I", 10**6) + PNG]), invalid, "says 1000000 bytes"),
        (infer_request(raw_input_contents=[RAW, RAW]), invalid, "2 entries for 1 input"),
        (infer_request(input_contents=pb.InferTensorContents(bytes_contents=[PNG])), invalid, "both"),
        (infer_request(raw_input_contents=[], input_contents=typed), invalid, "not fp32_contents"),
        (infer_request(raw_input_contents=[], input_contents=pb.InferTensorContents(bytes_contents=[PNG, PNG])),
         invalid, "shape [1] but 2 bytes_contents"),
        (infer_request(raw_input_contents=[]), invalid, "shape [1] but 0"),
        (infer_request(inputs=[]), invalid, "0 inputs"),
        (infer_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]), invalid, "unknown"),
        (infer_request(model_version="2"), grpc.StatusCode.NOT_FOUND, "no version '2'"),
        (infer_request(model_name=""), grpc.StatusCode.NOT_FOUND, "unknown model ''"),
    ]  # fmt: skip
    for msg, code, part in cases:
        if isinstance(msg, pb.ModelInferRequest):
            msg = msg.SerializeToString()
        got, details = infer_raw(grpc_address, msg)
        assert got == code and part in details, (part, got, details)
    bad_param = infer_request()
    bad_param.parameters.MergeFrom(param.parameters)
    assert infer_raw(grpc_address, bad_param.SerializeToString()) == (invalid, "parameter 'seed' has no value")
    ok = infer_request(raw_input_contents=[], input_contents=pb.InferTensorContents(bytes_contents=[PNG]))
    assert infer_raw(grpc_address, ok.SerializeToString())[0] == grpc.StatusCode.OK  # typed contents work too
