"""The Open Inference Protocol, proven with clients nobody here wrote: tritonclient (HTTP and gRPC, sync and asyncio)
and KServe's InferenceRESTClient, against a real mae-serve process with /v2 and gRPC on and an API key.

Every answer is compared with /v1 on the same image and seed: pixels exactly, the mask exactly, embeddings within
fp32 rounding. Errors must reach the client as its own exception type carrying our message and the right status.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.harness import free_port
from tests.serving import image_bytes, server_process

pytestmark = pytest.mark.integration

KEY = "v2-test-key"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}  # a new dict each time: tritonclient.http adds its own headers to it


def grpc_auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case


PNG = image_bytes(48, 40)
PNG2 = image_bytes(40, 56, seed=1)
MAX_GRPC_MESSAGE = 64 * 1024
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(weights):
    grpc_port = free_port()
    env = {
        "MAE_API_KEYS": KEY,
        "MAE_MAX_IMAGES_PER_REQUEST": "4",
        "MAE_GRPC_PORT": str(grpc_port),
        "MAE_GRPC_MAX_MESSAGE_BYTES": str(MAX_GRPC_MESSAGE),
    }
    with server_process(weights, **env) as s:
        s.grpc = f"127.0.0.1:{grpc_port}"
        yield s


@pytest.fixture(scope="module")
def http(server):
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc(server):
    c = tgrpc.InferenceServerClient(server.grpc)
    yield c
    c.close()


def http_image(*images: bytes) -> thttp.InferInput:
    t = thttp.InferInput("image", [len(images)], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    return t


def grpc_image(*images: bytes) -> tgrpc.InferInput:
    t = tgrpc.InferInput("image", [len(images)], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=object))
    return t


def v1(server, route: str, image: bytes = PNG, **params) -> httpx.Response:
    r = httpx.post(server.url + route, params=params, content=image, headers={"Content-Type": "image/png", **auth()},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


# ------------------------------------------------------------------------------------------------ health, metadata
def test_health_and_metadata_over_http_and_grpc(server, http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_model_ready(MODEL, headers=auth()) and grpc.is_model_ready(MODEL, headers=grpc_auth())
    assert "binary_tensor_data" in http.get_server_metadata(headers=auth())["extensions"]
    assert "binary_tensor_data" in grpc.get_server_metadata(headers=grpc_auth(), as_json=True)["extensions"]
    meta = http.get_model_metadata(MODEL, headers=auth())
    assert meta == http.get_model_metadata(MODEL, model_version="1", headers=auth())
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    models = httpx.get(server.url + "/v1/models", headers=auth()).json()["models"]
    d, n, size = models[0]["embed_dim"], models[0]["num_patches"], models[0]["image_size"]
    assert meta["name"] == models[0]["name"] == MODEL  # the names of /v1/models
    assert outputs == {
        "cls": ("FP32", [-1, d]), "mean": ("FP32", [-1, d]), "patches": ("FP32", [-1, -1, d]),
        "patch_indices": ("INT64", [-1, -1]), "mask": ("UINT8", [-1, n]), "mse": ("FP32", [-1]),
        **{v: ("UINT8", [-1, size, size, 3]) for v in ("reconstruction", "paste", "masked")},
    }  # fmt: skip
    gmeta = grpc.get_model_metadata(MODEL, headers=grpc_auth(), as_json=True)
    assert {o["name"]: (o["datatype"], [int(x) for x in o["shape"]]) for o in gmeta["outputs"]} == outputs


# ------------------------------------------------------------------------------------------------ embeddings
def test_embeddings_equal_v1_binary_and_json_outputs_http_and_grpc(server, http, grpc):
    want = v1(server, "/v1/embed").json()  # mask ratio 0: every patch
    binary = http.infer(MODEL, [http_image(PNG)], headers=auth())  # no outputs: cls, mean, patches, all binary
    assert binary.get_response()["parameters"] == {"mask_ratio": 0.0}
    assert all("binary_data_size" in o["parameters"] for o in binary.get_response()["outputs"])
    outs = [thttp.InferRequestedOutput(n, binary_data=False) for n in ("cls", "mean", "patches", "patch_indices")]
    as_json = http.infer(MODEL, [http_image(PNG)], outputs=outs, headers=auth())
    assert all("data" in o for o in as_json.get_response()["outputs"])
    over_grpc = grpc.infer(MODEL, [grpc_image(PNG)], headers=grpc_auth())
    for r in (binary, as_json, over_grpc):
        for name in ("cls", "mean", "patches"):
            got = r.as_numpy(name)
            assert got.dtype == np.float32 and got.shape == (1, *np.shape(want[name]))
            np.testing.assert_allclose(got[0], want[name], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(as_json.as_numpy("patch_indices")[0], want["patch_indices"])


def test_masked_embeddings_seed_and_fp16(server, http, grpc):
    want = v1(server, "/v1/embed", mask_ratio=0.5, seed=7).json()
    names = ("cls", "patches", "patch_indices", "mask")
    r = http.infer(MODEL, [http_image(PNG)], outputs=[thttp.InferRequestedOutput(n) for n in names],
                   parameters={"mask_ratio": 0.5, "seed": 7}, headers=auth())  # fmt: skip
    assert r.get_response()["parameters"] == {"mask_ratio": 0.5, "seed": 7}  # echoed
    np.testing.assert_array_equal(r.as_numpy("patch_indices")[0], want["patch_indices"])
    np.testing.assert_allclose(r.as_numpy("patches")[0], want["patches"], rtol=1e-6, atol=1e-6)
    mask = r.as_numpy("mask")[0]
    assert mask.dtype == np.uint8 and set(np.flatnonzero(mask == 0)) == set(want["patch_indices"])
    half = grpc.infer(MODEL, [grpc_image(PNG)], outputs=[tgrpc.InferRequestedOutput("patches")],
                      parameters={"mask_ratio": 0.5, "seed": 7, "dtype": "FP16"}, headers=grpc_auth())  # fmt: skip
    assert half.get_output("patches").datatype == "FP16" and half.as_numpy("patches").dtype == np.float16
    np.testing.assert_allclose(half.as_numpy("patches")[0], want["patches"], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------ reconstructions
def test_reconstruction_equals_v1_pixels_exactly(server, http, grpc):
    want = v1(server, "/v1/reconstruct", format="json", seed=3).json()  # default mask ratio 0.75
    names = ("reconstruction", "paste", "masked", "mask", "mse")
    by_http = http.infer(MODEL, [http_image(PNG)], outputs=[thttp.InferRequestedOutput(n) for n in names],
                         parameters={"seed": 3}, headers=auth())  # fmt: skip
    json_out = [thttp.InferRequestedOutput(n, binary_data=False) for n in names]
    by_json = http.infer(MODEL, [http_image(PNG)], outputs=json_out, parameters={"seed": 3}, headers=auth())
    by_grpc = grpc.infer(MODEL, [grpc_image(PNG)], outputs=[tgrpc.InferRequestedOutput(n) for n in names],
                         parameters={"seed": 3}, headers=grpc_auth())  # fmt: skip
    for r in (by_http, by_json, by_grpc):
        for view in ("reconstruction", "paste", "masked"):
            got = r.as_numpy(view)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got[0], png_pixels(want["images"][view]))  # exactly /v1's PNG pixels
        assert np.flatnonzero(r.as_numpy("mask")[0]).tolist() == want["mask"]
        assert abs(float(r.as_numpy("mse")[0]) - want["mse"]) <= 1e-6 * max(1.0, want["mse"])
    params = by_http.get_response()["parameters"]
    assert params == {"seed": 3, "mask_ratio": want["mask_ratio"]} and want["mask_ratio"] == 0.75


def test_explicit_mask_and_several_images(server, http):
    mask = "0,1,2,5,8,13"
    r = http.infer(MODEL, [http_image(PNG, PNG2)], outputs=[thttp.InferRequestedOutput(n) for n in ("mask", "paste")],
                   parameters={"mask": mask}, headers=auth())  # fmt: skip
    params = r.get_response()["parameters"]
    assert "seed" not in params and params["mask_ratio"] == 6 / 16  # an explicit mask: no seed was used
    assert r.as_numpy("paste").shape == (2, 32, 32, 3)
    for i in range(2):
        assert np.flatnonzero(r.as_numpy("mask")[i]).tolist() == [0, 1, 2, 5, 8, 13]
    for i, image in enumerate((PNG, PNG2)):  # each image's pixels as /v1 draws them (within rounding: batch of 2)
        want = png_pixels(v1(server, "/v1/reconstruct", image, format="json", mask=mask).json()["images"]["paste"])
        assert np.abs(r.as_numpy("paste")[i].astype(int) - want).max() <= 1


def test_embedding_and_pixel_outputs_together_run_both_passes_on_one_mask(server, http):
    outputs = [thttp.InferRequestedOutput(n) for n in ("cls", "patch_indices", "paste", "mask")]
    r = http.infer(MODEL, [http_image(PNG)], model_version="1", headers=auth(), parameters={"seed": 4}, outputs=outputs)
    assert r.get_response()["parameters"] == {"seed": 4, "mask_ratio": 0.75}  # a pixel output: /v1's 0.75
    embed = v1(server, "/v1/embed", mask_ratio=0.75, seed=4).json()  # the encoder on the visible patches
    recon = v1(server, "/v1/reconstruct", format="json", seed=4).json()
    np.testing.assert_allclose(r.as_numpy("cls")[0], embed["cls"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(r.as_numpy("patch_indices")[0], embed["patch_indices"])
    np.testing.assert_array_equal(r.as_numpy("paste")[0], png_pixels(recon["images"]["paste"]))
    assert np.flatnonzero(r.as_numpy("mask")[0]).tolist() == recon["mask"]
    text = server.metrics()
    assert 'mae_requests_total{route="/v2/models/{model_name}/versions/{model_version}/infer",status="200"}' in text


def test_a_json_body_carries_images_as_base64(server, http):
    """No binary data at all: each BYTES element is the image in base64, every output JSON."""
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}],
            "outputs": [{"name": "mean"}], "parameters": {"seed": 1}}  # fmt: skip
    r = httpx.post(server.url + "/v2/models/tiny/infer", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    (out,) = r.json()["outputs"]
    want = http.infer(MODEL, [http_image(PNG)], outputs=[thttp.InferRequestedOutput("mean")], headers=auth())
    assert out["datatype"] == "FP32" and out["shape"] == [1, 32]
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=np.float32), want.as_numpy("mean").ravel())


# ------------------------------------------------------------------------------------------------ asyncio, concurrency
def test_async_and_concurrent_calls_match_sequential_ones(server, http, grpc):
    seeds = list(range(10, 18))
    names = ("mask", "cls")

    def expected(seed: int) -> tuple[list[int], np.ndarray]:
        r = grpc.infer(MODEL, [grpc_image(PNG)], outputs=[tgrpc.InferRequestedOutput(n) for n in names],
                       parameters={"seed": seed, "mask_ratio": 0.5}, headers=grpc_auth())  # fmt: skip
        return np.flatnonzero(r.as_numpy("mask")[0]).tolist(), r.as_numpy("cls")[0]

    want = {s: expected(s) for s in seeds}

    async def run() -> tuple[list, list]:
        h = thttp_aio.InferenceServerClient(server.url.removeprefix("http://"))
        g = tgrpc_aio.InferenceServerClient(server.grpc)
        try:
            assert await h.is_server_ready() and await g.is_server_ready()
            via_http = asyncio.gather(*(
                h.infer(MODEL, [http_image(PNG)], outputs=[thttp_aio.InferRequestedOutput(n) for n in names],
                        parameters={"seed": s, "mask_ratio": 0.5}, headers=auth()) for s in seeds))  # fmt: skip
            via_grpc = asyncio.gather(*(
                g.infer(MODEL, [grpc_image(PNG)], outputs=[tgrpc_aio.InferRequestedOutput(n) for n in names],
                        parameters={"seed": s, "mask_ratio": 0.5}, headers=grpc_auth()) for s in seeds))  # fmt: skip
            a, b = await asyncio.gather(via_http, via_grpc)  # 16 calls in flight at once, two protocols
            with pytest.raises(InferenceServerException) as e:
                await g.infer("nope", [grpc_image(PNG)], headers=grpc_auth())
            assert e.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in e.value.message()
            return a, b
        finally:
            await h.close()
            await g.close()

    a, b = asyncio.run(run())
    for results in (a, b):
        for seed, r in zip(seeds, results, strict=True):
            mask, cls = want[seed]
            assert np.flatnonzero(r.as_numpy("mask")[0]).tolist() == mask
            np.testing.assert_allclose(r.as_numpy("cls")[0], cls, rtol=1e-5, atol=1e-5)
    assert len({tuple(want[s][0]) for s in seeds}) > 1  # the seeds did draw different masks


# ------------------------------------------------------------------------------------------------ errors
def http_error(fn, *args, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        fn(*args, **kw)
    return e.value


def test_errors_are_the_clients_own_exceptions_with_our_messages(server, http, grpc):
    cases = [  # (what, HTTP status, gRPC code, part of our message, the call over each protocol)
        ("no key", "401", "UNAUTHENTICATED", "missing API key",
         lambda c, h, img: c.infer(MODEL, [img(PNG)])),
        ("wrong key", "401", "UNAUTHENTICATED", "wrong API key",
         lambda c, h, img: c.get_model_metadata(MODEL, headers={next(iter(h)): "Bearer nope"})),
        ("unknown model", "404", "NOT_FOUND", "unknown model 'nope'",
         lambda c, h, img: c.infer("nope", [img(PNG)], headers=h)),
        ("unknown version", "404", "NOT_FOUND", "has no version '7'",
         lambda c, h, img: c.get_model_metadata(MODEL, model_version="7", headers=h)),
        ("not an image", "400", "INVALID_ARGUMENT", "unsupported image type",
         lambda c, h, img: c.infer(MODEL, [img(b"junk")], headers=h)),
        ("image 1 of 2 bad", "400", "INVALID_ARGUMENT", "image 1: unsupported image type",
         lambda c, h, img: c.infer(MODEL, [img(PNG, b"junk")], headers=h)),
        ("too many images", "413", "RESOURCE_EXHAUSTED", "5 images in one request; the limit is 4",
         lambda c, h, img: c.infer(MODEL, [img(*[PNG] * 5)], headers=h)),
        ("bad parameter", "400", "INVALID_ARGUMENT", "mask_ratio: Input should be less than 1",
         lambda c, h, img: c.infer(MODEL, [img(PNG)], parameters={"mask_ratio": 1.5}, headers=h)),
        ("unknown parameter", "400", "INVALID_ARGUMENT", "view: unknown parameter",
         lambda c, h, img: c.infer(MODEL, [img(PNG)], parameters={"view": "grid"}, headers=h)),
        ("bad mask", "400", "INVALID_ARGUMENT", "mask",
         lambda c, h, img: c.infer(MODEL, [img(PNG)], parameters={"mask": "0,999"}, headers=h)),
    ]  # fmt: skip
    for what, status, code, message, call in cases:
        e = http_error(call, http, auth(), http_image)
        assert e.status() == status and message in e.message(), (what, e.status(), e.message())
        g = http_error(call, grpc, grpc_auth(), grpc_image)
        assert g.status() == f"StatusCode.{code}" and message in g.message(), (what, g.status(), g.message())
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_GRPC_MESSAGE  # over MAE_GRPC_MAX_MESSAGE_BYTES: grpcio refuses it
    g = http_error(grpc.infer, MODEL, [grpc_image(buf.getvalue())], headers=grpc_auth())
    assert g.status() == "StatusCode.RESOURCE_EXHAUSTED", g
    assert http.infer(MODEL, [http_image(buf.getvalue())], headers=auth()).as_numpy("cls").shape == (1, 32)  # HTTP: ok


def test_v2_error_bodies_have_the_protocol_shape(server):
    for r, status in [
        (httpx.post(server.url + "/v2/models/tiny/infer", content=b"{}"), 401),
        (httpx.get(server.url + "/v2/models/nope", headers=auth()), 404),
        (httpx.post(server.url + "/v2/models/tiny/infer", content=b"{", headers=auth()), 400),
        (httpx.get(server.url + "/v2/nothing-here", headers=auth()), 404),
    ]:
        assert r.status_code == status and set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}  # probes need no key
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}


# ------------------------------------------------------------------------------------------------ KServe's client
KSERVE_CLIENT = """
import asyncio, base64, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferRequest, InferInput, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

url, key, png = sys.argv[1], sys.argv[2], base64.b64decode(sys.argv[3])

async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=object), binary_data=True)
    request = InferRequest(model_name="tiny", infer_inputs=[image], parameters={"seed": 5, "mask_ratio": 0.5},
                           request_outputs=[RequestedOutput("cls", parameters={"binary_data": True}),
                                            RequestedOutput("mask", parameters={"binary_data": False})])
    headers = {"Authorization": "Bearer " + key}
    ready = await client.is_server_ready(url, headers=headers)
    r = await client.infer(url, request, model_name="tiny", headers=headers)
    out = {o.name: o.as_numpy().tolist() for o in r.outputs}
    print(json.dumps({"ready": ready, "parameters": dict(r.parameters or {}), "outputs": out}))

asyncio.run(main())
"""


def test_kserve_inference_rest_client(server):
    """kserve and tritonclient.grpc both register the protobuf package `inference` (their own copies of the
    protocol's messages) and protobuf allows one per process: the KServe client runs in a process of its own."""
    png = base64.b64encode(PNG).decode()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(KSERVE_CLIENT), server.url, KEY, png],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    want = v1(server, "/v1/embed", mask_ratio=0.5, seed=5, pool="cls").json()
    want_mask = v1(server, "/v1/reconstruct", format="json", mask_ratio=0.5, seed=5).json()["mask"]
    assert got["ready"] is True
    np.testing.assert_allclose(np.asarray(got["outputs"]["cls"])[0], want["cls"], rtol=1e-6, atol=1e-6)
    assert np.flatnonzero(np.asarray(got["outputs"]["mask"])[0]).tolist() == want_mask
