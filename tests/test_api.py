"""The HTTP contract of /v1/reconstruct, /v1/embed, /v1/models, health and metrics."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.settings import Settings
from model.formats import load
from model.masking import Masking, len_keep_for_ratio, random_noise
from tests.serving import app_client, assert_error, image_bytes, live_server, make_weights

pytestmark = pytest.mark.integration

VIEWS = ["paste", "reconstruction", "masked", "original", "grid", "error"]


@pytest.fixture(scope="module")
def client(make_settings):
    with app_client(make_settings(max_wait_ms=0)) as c:
        yield c


PNG = image_bytes()


def post(client, path, form="raw", params=None, data=PNG, **json_fields):
    if form == "raw":
        return client.post(path, params=params, content=data, headers={"Content-Type": "image/png"})
    if form == "multipart":
        return client.post(path, params=params, files={"image": ("x.png", data, "image/png")})
    body = {"image": base64.b64encode(data).decode(), **json_fields}
    return client.post(path, params=params, json=body)


def png_of(r) -> Image.Image:
    assert r.headers["content-type"] == "image/png", r.text
    return Image.open(io.BytesIO(r.content))


@pytest.mark.parametrize("form", ["raw", "multipart", "json"])
@pytest.mark.parametrize("view", VIEWS)
def test_reconstruct_png_every_form_and_view(client, form, view):
    r = post(client, "/v1/reconstruct", form, {"view": view, "seed": 1})
    assert r.status_code == 200, r.text
    im = png_of(r)
    assert im.size == ((32 * 4 + 12, 32) if view == "grid" else (32, 32))
    assert r.headers["x-mae-seed"] == "1"
    assert r.headers["x-mae-model"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{64}", r.headers["x-mae-weights-sha256"])
    assert float(r.headers["x-mae-mask-ratio"]) == 0.75


@pytest.mark.parametrize("form", ["raw", "multipart", "json"])
def test_reconstruct_json_has_every_view_and_the_mask(client, form):
    r = post(client, "/v1/reconstruct", form, {"format": "json", "seed": 5, "mask_ratio": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 5 and body["grid"] == [4, 4] and body["patch_size"] == 8 and body["model"] == "tiny"
    assert len(body["mask"]) == 16 - int(16 * 0.5) and body["mask_ratio"] == 0.5
    assert set(body["images"]) == set(VIEWS)
    for v in body["images"].values():
        Image.open(io.BytesIO(base64.b64decode(v))).verify()
    assert body["mse"] > 0 and body["psnr"] == pytest.approx(10 * np.log10(1 / body["mse"]))


def test_params_as_form_and_json_fields(client):
    r = client.post(
        "/v1/reconstruct",
        files={"image": ("x.png", PNG, "image/png")},
        data={"format": "json", "seed": "9", "mask_ratio": "0.25"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["seed"] == 9 and len(r.json()["mask"]) == 4
    r2 = post(client, "/v1/reconstruct", "json", format="json", seed=9, mask_ratio=0.25)
    assert r2.json()["mask"] == r.json()["mask"]


def test_same_seed_same_bytes_other_seed_other_mask(client):
    a = post(client, "/v1/reconstruct", params={"seed": 7})
    b = post(client, "/v1/reconstruct", params={"seed": 7})
    c = post(client, "/v1/reconstruct", params={"seed": 8})
    assert a.content == b.content
    assert a.headers["x-mae-mask"] == b.headers["x-mae-mask"] != c.headers["x-mae-mask"]


def test_seed_is_drawn_and_echoed_when_absent(client):
    r = post(client, "/v1/reconstruct", params={"format": "json"})
    seed = r.json()["seed"]
    assert isinstance(seed, int)
    again = post(client, "/v1/reconstruct", params={"format": "json", "seed": seed})
    assert again.json()["mask"] == r.json()["mask"]


def test_explicit_mask_is_honoured(client):
    r = post(client, "/v1/reconstruct", params={"format": "json", "mask": "0,5,15", "seed": 3})
    body = r.json()
    assert body["mask"] == [0, 5, 15] and body["seed"] is None
    assert body["mask_ratio"] == pytest.approx(3 / 16)


def test_masked_view_blanks_exactly_the_masked_patches(client):
    r = post(client, "/v1/reconstruct", params={"view": "masked", "mask": "1,2"})
    a = np.asarray(png_of(r))
    patches = a.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
    zero = [i for i in range(16) if patches[i].max() == 0]
    assert zero == [1, 2]


def test_embed_ratio_zero_equals_the_model_encoder(client, weights):
    r = post(client, "/v1/embed", params={"pool": "all"})
    assert r.status_code == 200, r.text
    body = r.json()
    from app.serving.imaging import decode, preprocess
    from app.serving.model_thread import to_input

    x = to_input(torch.from_numpy(preprocess(decode(PNG, 10**8), 32)[None].copy()), torch.device("cpu"), torch.float32)
    ref = load(weights).model.encode(x)
    assert body["dim"] == 32 and body["grid"] == [4, 4] and body["patch_indices"] == list(range(16))
    assert np.allclose(body["cls"], ref.cls[0].numpy(), atol=1e-5)
    assert np.allclose(body["patches"], ref.patches[0].numpy(), atol=1e-5)
    assert np.allclose(body["mean"], ref.patches[0].mean(0).numpy(), atol=1e-5)


@pytest.mark.parametrize("pool,keys", [("cls", {"cls"}), ("mean", {"mean"}), ("patches", {"patches", "patch_indices"})])
def test_embed_pools(client, pool, keys):
    body = post(client, "/v1/embed", "multipart", {"pool": pool}).json()
    assert keys <= set(body) and not ({"cls", "mean", "patches"} - keys) & set(body)


def test_embed_masked_returns_visible_patches_only(client):
    body = post(client, "/v1/embed", params={"mask_ratio": 0.75, "seed": 2}).json()
    masking = Masking(random_noise(1, 16, seed=2), len_keep_for_ratio(16, 0.75))
    visible = sorted(set(range(16)) - set(masking.masked_indices()[0]))
    assert body["patch_indices"] == visible and len(body["patches"]) == 4 and body["seed"] == 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_binary_formats(client, dtype):
    j = post(client, "/v1/embed").json()
    r = post(client, "/v1/embed", params={"format": "npz", "dtype": dtype})
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert z["patches"].dtype == np.dtype(dtype) and z["patches"].shape == (16, 32)
    assert np.allclose(z["cls"], j["cls"], atol=1e-2 if dtype == "float16" else 1e-6)
    assert z["patch_indices"].tolist() == list(range(16)) and z["grid"].tolist() == [4, 4]
    r = post(client, "/v1/embed", params={"format": "npy", "pool": "mean", "dtype": dtype})
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.shape == (32,) and np.allclose(arr, j["mean"], atol=1e-2 if dtype == "float16" else 1e-6)
    assert post(client, "/v1/embed", params={"format": "npy"}).status_code == 422  # pool=all needs npz


def test_several_images_per_request_errors_stay_per_image(client):
    files = [
        ("image", ("a.png", PNG, "image/png")),
        ("image", ("b.png", b"not an image", "image/png")),
        ("image", ("c.png", image_bytes(seed=3), "image/png")),
    ]
    r = client.post("/v1/reconstruct", params={"format": "json", "seed": 1}, files=files)
    assert r.status_code == 200, r.text
    a, b, c = r.json()
    assert a["mask"] == c["mask"] and "images" in a
    assert b["error"]["status"] == 415 and b["error"]["code"] == "unsupported_type"
    body = {"images": [base64.b64encode(PNG).decode()] * 2, "pool": "cls"}
    r = client.post("/v1/embed", json=body)
    assert [len(x["cls"]) for x in r.json()] == [32, 32]
    z = np.load(io.BytesIO(client.post("/v1/embed", params={"format": "npz"}, json=body).content))
    assert z["cls"].shape == (2, 32)


def test_the_page_and_its_files_are_served(client):
    """GET / is the demo page and /static/ its files, from the package's app/static (a 404 after the move to
    app/http/routes: the page's path was counted from the module's own folder)."""
    from app.http.routes.page import STATIC

    r = client.get("/")
    assert r.status_code == 200 and r.content == (STATIC / "index.html").read_bytes()
    assert client.get("/static/app.js").status_code == 200


def test_models_and_health(client, weights):
    m = client.get("/v1/models").json()
    info = m["models"][0]
    assert m["default"] == "tiny" and info["patch_size"] == 8 and info["image_size"] == 32
    assert info["has_decoder"] and not info["norm_pix_loss"] and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["parameters"] > 0
    assert info["max_batch_size"] == 4  # a CPU model: MAE_CPU_MAX_BATCH_SIZE caps MAE_MAX_BATCH_SIZE (32)
    assert m["limits"] == {"max_images_per_request": 16, "max_queue": 256, "max_body_bytes": 20 * 1024 * 1024}
    from app.serving.cpus import cpu_features

    assert m["runtime"]["cpu"] == cpu_features()["cpu"] and "omp" in m["runtime"]  # the CPU and the wait policy
    import hashlib

    assert info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------------------------------------ errors
def test_error_codes(client):
    assert_error(post(client, "/v1/reconstruct", data=b"\x89PNG\r\n\x1a\nbroken"), 400, "undecodable")
    assert_error(post(client, "/v1/reconstruct", data=b""), 400)
    assert_error(client.post("/v1/reconstruct", content=b"GIF89a....", headers={"Content-Type": "image/gif"}), 415)
    assert_error(post(client, "/v1/reconstruct", data=image_bytes(fmt="GIF")), 415, "unsupported_type")
    assert_error(client.post("/v1/reconstruct", content=PNG), 415, "missing_content_type")
    for bad in (
        {"mask_ratio": "nan"},
        {"mask_ratio": "1"},
        {"mask_ratio": "-0.1"},
        {"mask_ratio": "inf"},
        {"seed": "-1"},
        {"seed": "abc"},
        {"seed": str(2**70)},
        {"view": "nope"},
        {"format": "gif"},
        {"mask": "1,x"},
        {"mask": "99"},
        {"mask": "1,1"},
        {"mask": ",".join(map(str, range(16)))},
        {"model": "nope"},
        {"bogus": "1"},
    ):
        assert_error(post(client, "/v1/reconstruct", params=bad), 422)
    assert_error(client.post("/v1/reconstruct", content=b"{", headers={"Content-Type": "application/json"}), 400)
    assert_error(client.get("/v1/nothing"), 404, "not_found")


def test_body_and_pixel_and_count_limits(make_settings):
    s = make_settings(max_body_bytes=4096, max_image_pixels=60 * 60, max_images_per_request=2)
    with app_client(s) as c:
        assert_error(post(c, "/v1/reconstruct", data=image_bytes(100, 100)), 413, "body_too_large")
        assert_error(post(c, "/v1/reconstruct", data=image_bytes(70, 60, fmt="JPEG")), 413, "too_many_pixels")
        files = [("image", ("a.png", image_bytes(8, 8), "image/png"))] * 3
        assert_error(c.post("/v1/embed", files=files), 413, "too_many_images")


def test_api_keys(make_settings):
    with app_client(make_settings(api_keys="k1,k2")) as c:
        assert_error(post(c, "/v1/embed"), 401, "unauthorized")
        assert_error(
            c.post("/v1/embed", content=PNG, headers={"Content-Type": "image/png", "Authorization": "Bearer nope"}), 401
        )
        ok = c.post("/v1/embed", content=PNG, headers={"Content-Type": "image/png", "Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_encoder_only_model_refuses_reconstruction(tmp_path):
    w = make_weights(tmp_path, "enc", has_decoder=False)
    with app_client(Settings(weights=str(w))) as c:
        assert_error(post(c, "/v1/reconstruct"), 422, "no_decoder")
        assert post(c, "/v1/embed").status_code == 200


def test_several_models_by_name(tmp_path):
    a, b = make_weights(tmp_path, "a", seed=1), make_weights(tmp_path, "b", seed=2)
    with app_client(Settings(weights=f"first={a},second={b}")) as c:
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["first", "second"]
        ea = post(c, "/v1/embed", params={"pool": "cls"}).json()
        eb = post(c, "/v1/embed", params={"pool": "cls", "model": "second"}).json()
        assert ea["model"] == "first" and eb["model"] == "second" and ea["cls"] != eb["cls"]


# ------------------------------------------------------------------------------------------------ real HTTP
def batch_count() -> tuple[float, float]:
    from app.serving import metrics

    samples = {s.name: s.value for s in metrics.BATCH_SIZE.collect()[0].samples if s.labels.get("op") == "reconstruct"}
    return samples.get("mae_batch_size_count", 0.0), samples.get("mae_batch_size_sum", 0.0)


def test_real_http_concurrent_requests_share_forward_passes(make_settings):
    s = make_settings(max_wait_ms=300, max_batch_size=8)
    with live_server(s) as (url, _):
        before = batch_count()

        def one(i):
            return httpx.post(
                url + "/v1/reconstruct",
                params={"seed": i},
                content=PNG,
                headers={"Content-Type": "image/png"},
                timeout=30,
            )

        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(one, range(8)))
        assert all(r.status_code == 200 for r in rs)
        after = batch_count()
        passes, images = after[0] - before[0], after[1] - before[1]
        assert images == 8 and passes < 8, (passes, images)  # at least one pass served several requests
        text = httpx.get(url + "/metrics").text
        assert 'mae_requests_total{route="/v1/reconstruct",status="200"}' in text


def test_readiness_waits_for_loading(make_settings, monkeypatch):
    import time as _time

    from app.serving.registry import Registry

    real = Registry.from_settings

    def slow(settings):
        _time.sleep(1.0)
        return real(settings)

    monkeypatch.setattr(Registry, "from_settings", staticmethod(slow))
    with live_server(make_settings(), wait_ready=False) as (url, _):
        first = httpx.get(url + "/readyz")
        assert first.status_code == 503 and first.json()["status"] == "loading"
        assert httpx.get(url + "/healthz").status_code == 200
        r = httpx.post(url + "/v1/embed", content=PNG, headers={"Content-Type": "image/png"})
        assert_error(r, 503, "not_ready")
        assert "retry-after" in r.headers
        for _ in range(200):
            if httpx.get(url + "/readyz").status_code == 200:
                break
            _time.sleep(0.05)
        assert httpx.get(url + "/readyz").status_code == 200


def test_openapi_documents_bodies(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/reconstruct"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "image/webp", "application/json"} <= set(body)
    params = {p["name"] for p in spec["paths"]["/v1/embed"]["post"]["parameters"]}
    assert {"mask_ratio", "seed", "mask", "pool", "format", "dtype", "model"} <= params
    json.dumps(spec)


def test_client_library(make_settings):
    from client.mae_client import MAEClient, MAEError

    with live_server(make_settings()) as (url, _), MAEClient(url) as c:
        png = c.reconstruct(PNG, mask_ratio=0.5, seed=3)
        assert png.startswith(b"\x89PNG")
        emb = c.embed(PNG, pool="all")
        assert emb["patches"].shape == (16, 32) and emb["cls"].shape == (32,)
        with pytest.raises(MAEError) as e:
            c.reconstruct(b"junk")
        assert e.value.status == 415


def test_a_jpeg_reaches_the_model_as_the_reference_preprocessing_gives_it(make_settings):
    """Full decode + bicubic resize (the official demo's and Hugging Face's): the 'original' view is the model's input,
    pixel for pixel. MAE_JPEG_DRAFT (off by default) decodes at a reduced DCT scale and differs: the check can fail."""
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))

    def original(settings: Settings) -> np.ndarray:
        with app_client(settings) as c:
            r = c.post("/v1/reconstruct", params={"view": "original", "mask_ratio": 0}, content=data,
                       headers={"Content-Type": "image/jpeg"})  # fmt: skip
            assert r.status_code == 200, r.text
            return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))

    assert np.array_equal(original(make_settings()), reference)
    assert not np.array_equal(original(make_settings(jpeg_draft=True)), reference)
