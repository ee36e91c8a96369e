"""POST /v1/embeddings (app/openai): OpenAI's embeddings API for images, proven with clients nobody here wrote.

- the official `openai` SDK, sync and async, float and base64: the numbers equal /v1/embed's (cls and mean);
- its typed exceptions carry our messages: BadRequestError, UnprocessableEntityError, AuthenticationError,
  NotFoundError, APIStatusError (503 on overload);
- LangChain's OpenAIEmbeddings with a custom base URL, where installed;
- hostile bodies get a clear 4xx in OpenAI's error shape, never a 5xx;
- image URLs, when MAE_URL_FETCH_HOSTS turns them on, only from allowed hosts and public or named addresses,
  against loopback servers: redirects, other loopback forms, private and metadata addresses, oversize, slow.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import ipaddress
import json
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from app.openai import fetch
from app.serving.errors import ImageTooLarge, UnreadableImage
from app.settings import Settings
from tests.serving import app_client, image_bytes, live_server, make_weights

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
PICS = [image_bytes(48, 40, seed=1), image_bytes(64, 64, fmt="JPEG", seed=2), image_bytes(30, 50, seed=3)]


def uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def v1_embed(url: str, data: bytes, **params) -> dict:
    r = httpx.post(
        url + "/v1/embed", params=params, json={"image": base64.b64encode(data).decode()},
        headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def close(a, b) -> None:
    """Equal within fp32 rounding (batches of other sizes may sum in another order)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape and a.shape[0] > 1, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """A 4xx (never a 5xx) in OpenAI's error shape."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == {401: "authentication_error"}.get(status, "invalid_request_error"), err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("w"))


# ------------------------------------------------------------------------------------------------ a loopback origin
class Origin(http.server.ThreadingHTTPServer):
    """Image URLs' other end, on 127.0.0.1: /ok.png, /text, /missing, /big (Content-Length), /chunked (no length,
    over the limit), /slow (never finishes until released), /to?url=... (302), /loop (302 to itself)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Origin
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/ok.png":
            self._send(200, PICS[0])
        elif path == "/text":
            self._send(200, b"just some text, not an image", "text/plain")
        elif path == "/big":
            self._send(200, b"\x89PNG\r\n\x1a\n" + bytes(200_000))
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = bytes(16_384)
            with contextlib.suppress(OSError):
                for _ in range(64):  # 1 MiB, over the 64 KiB limit
                    self.wfile.write(b"4000\r\n" + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"\x89PNG")
                self.wfile.flush()
                self.server.release.wait(30)
        elif path == "/to":
            self._send(302, b"", Location=query.removeprefix("url="))
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        else:
            self._send(404, b"no", "text/plain")


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = Origin()
    t = threading.Thread(target=o.serve_forever, daemon=True)
    t.start()
    try:
        yield o
    finally:
        o.release.set()
        o.shutdown()


@pytest.fixture(scope="module")
def server(make_settings, origin):
    """API keys on; URLs allowed from 127.0.0.1 (named, so reachable although loopback) with tight limits."""
    s = make_settings(
        api_keys=KEY, max_wait_ms=0, max_images_per_request=4, log_level="critical",
        url_fetch_hosts="127.0.0.1", url_fetch_max_bytes=64 * 1024, url_fetch_timeout_s=1.0, url_fetch_max_redirects=2,
    )  # fmt: skip
    with live_server(s) as (url, _):
        yield url


def client(url: str, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, **kw)


# ------------------------------------------------------------------------------------------------ the SDK: numbers
@pytest.mark.integration
@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sdk_sync_equals_v1_embed(server, encoding, pooling):
    c = client(server)
    r = c.embeddings.create(
        model="tiny", input=[uri(p) for p in PICS], encoding_format=encoding,
        extra_body={"modality": "image", "pooling": pooling},
    )  # fmt: skip
    assert r.object == "list" and r.model == "tiny" and [d.index for d in r.data] == [0, 1, 2]
    for d, pic in zip(r.data, PICS, strict=True):
        assert d.object == "embedding" and isinstance(d.embedding, list if encoding == "float" else str)
        got = d.embedding if encoding == "float" else np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        close(got, v1_embed(server, pic, pool=pooling)[pooling])
    assert r.usage.prompt_tokens == r.usage.total_tokens == 3 * 16  # every patch of the 32 px / 8 px test model


@pytest.mark.integration
def test_sdk_default_encoding_is_base64_little_endian_float32(server):
    """The SDK asks for base64 unless told and decodes it; the raw answer is little-endian float32."""
    raw = client(server).embeddings.with_raw_response.create(model="tiny", input=uri(PICS[1]))
    parsed = raw.parse()
    assert isinstance(parsed.data[0].embedding, list)
    close(parsed.data[0].embedding, v1_embed(server, PICS[1], pool="cls")["cls"])
    body = json.loads(raw.http_request.content)
    assert body["encoding_format"] == "base64"
    got = np.frombuffer(base64.b64decode(raw.http_response.json()["data"][0]["embedding"]), dtype="<f4")
    close(got, v1_embed(server, PICS[1], pool="cls")["cls"])  # cls: the default for a model with a CLS token


@pytest.mark.integration
def test_sdk_async_and_masking_options(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(
                c.embeddings.create(model="tiny", input=[uri(PICS[2])], encoding_format="float"),
                c.embeddings.create(
                    model="tiny", input=base64.b64encode(PICS[2]).decode(),  # bare base64, one string
                    extra_body={"pooling": "mean", "mask_ratio": 0.5, "seed": 7, "resize": "crop"},
                ),
            )  # fmt: skip

    plain, masked = asyncio.run(go())
    close(plain.data[0].embedding, v1_embed(server, PICS[2], pool="cls")["cls"])
    ref = v1_embed(server, PICS[2], pool="all", mask_ratio=0.5, seed=7, resize="crop")
    close(masked.data[0].embedding, ref["mean"])
    assert masked.usage.prompt_tokens == len(ref["patch_indices"]) == 8  # the patches the encoder saw


@pytest.mark.integration
def test_url_input_equals_data_uri(server, origin):
    c = client(server)
    by_url = c.embeddings.create(model="tiny", input=[origin.url + "/ok.png", uri(PICS[0])])
    close(by_url.data[0].embedding, by_url.data[1].embedding)
    close(by_url.data[0].embedding, v1_embed(server, PICS[0], pool="cls")["cls"])


# ------------------------------------------------------------------------------------------------ the SDK: errors
@pytest.mark.integration
def test_sdk_typed_errors_carry_our_messages(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="no-such-model", input=uri(PICS[0]))
    assert "unknown model 'no-such-model'" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="tiny", input=["a photo of a cat"])
    assert "not an image" in e.value.message and e.value.code == "bad_base64"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.embeddings.create(model="tiny", input=uri(PICS[0]), dimensions=8)
    assert "not Matryoshka-trained" in e.value.message and e.value.param == "dimensions"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.embeddings.create(model="tiny", input=uri(PICS[0]), extra_body={"modality": "text"})
    assert "embeds images only" in e.value.message
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="tiny", input=uri(PICS[0])
        )
    assert "wrong API key" in e.value.message and e.value.type == "authentication_error"
    with pytest.raises(openai.APIStatusError) as e:  # 413: one image over the per-request limit
        c.embeddings.create(model="tiny", input=[uri(PICS[0])] * 5)
    assert e.value.status_code == 413 and "the limit is 4" in e.value.message
    # dimensions equal to the width is accepted, and `user` ignored
    ok = c.embeddings.create(model="tiny", input=uri(PICS[0]), dimensions=32, user="someone")
    assert len(ok.data[0].embedding) == 32


@pytest.mark.integration
def test_sdk_overload_is_503_with_retry_after(make_settings):
    """The model held; more requests than the queue takes: the refused ones are APIStatusError 503, overloaded."""
    entered, release = threading.Event(), threading.Event()
    from app.serving import model_thread

    def held(*args, **kw):
        entered.set()
        release.wait(30)
        return model_thread.forward(*args, **kw)

    s = make_settings(max_wait_ms=0, max_queue=1, max_batch_size=1, cpu_max_batch_size=1,
                 warmup=False, log_level="critical")  # fmt: skip
    with live_server(s, forward=held) as (url, _):
        c = client(url)
        outcomes: list = []

        def call() -> None:
            try:
                outcomes.append(c.embeddings.create(model="tiny", input=uri(PICS[0])))
            except openai.APIStatusError as e:
                outcomes.append(e)

        first = threading.Thread(target=call)
        first.start()
        assert entered.wait(30)
        others = [threading.Thread(target=call) for _ in range(4)]
        for t in others:
            t.start()
        while not any(isinstance(o, openai.APIStatusError) for o in outcomes) and any(t.is_alive() for t in others):
            threading.Event().wait(0.02)
        release.set()
        for t in [first, *others]:
            t.join(60)
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    assert len(outcomes) == 5 and refused, outcomes
    for e in refused:
        assert e.status_code == 503 and e.code == "overloaded" and e.type == "server_error", e
        assert e.response.headers["Retry-After"] == "1"


@pytest.mark.integration
def test_langchain_openai_embeddings(server):
    lc = pytest.importorskip("langchain_openai")
    emb = lc.OpenAIEmbeddings(
        model="tiny", base_url=server + "/v1", api_key=KEY, check_embedding_ctx_length=False, max_retries=0
    )
    vectors = emb.embed_documents([uri(PICS[0]), uri(PICS[1])])
    close(vectors[1], v1_embed(server, PICS[1], pool="cls")["cls"])
    close(emb.embed_query(uri(PICS[0])), vectors[0])


# ------------------------------------------------------------------------------------------------ URL tricks
@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/to?url=http://127.0.0.2:{port}/ok.png", 400, "url_not_allowed"),  # loopback, not named
        ("/to?url=http://localhost:{port}/ok.png", 400, "url_not_allowed"),
        ("/to?url=http://2130706433:{port}/ok.png", 400, "url_not_allowed"),  # 127.0.0.1 as one number
        ("/to?url=http://[::ffff:127.0.0.1]:{port}/ok.png", 400, "url_not_allowed"),
        ("/to?url=http://169.254.169.254/latest/meta-data/", 400, "url_not_allowed"),
        ("/to?url=file:///etc/passwd", 400, "url_not_allowed"),
        ("/loop", 400, "fetch_failed"),
        ("/missing", 400, "fetch_failed"),
        ("/slow", 400, "fetch_failed"),
        ("/big", 413, "fetched_too_large"),
        ("/chunked", 413, "fetched_too_large"),
        ("/text", 415, "unsupported_format"),
        ("/a b.png", 400, "url_not_allowed"),  # a target HTTP cannot carry
    ],
)
def test_url_refusals_are_clear_4xx(server, origin, path, status, code):
    port = origin.server_address[1]
    body = {"model": "tiny", "input": [uri(PICS[0]), origin.url + path.format(port=port)]}
    r = httpx.post(server + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    err = assert_openai_error(r, status, param="input")
    assert err["message"].startswith("input[1]: "), err
    if code != "unsupported_format":
        assert err["code"] == code, err


@pytest.mark.integration
@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433:{port}/ok.png", "http://0x7f000001:{port}/ok.png", "http://127.1:{port}/ok.png",
        "http://[::ffff:127.0.0.1]:{port}/ok.png", "http://[::1]:{port}/ok.png", "http://localhost:{port}/ok.png",
        "http://user:pw@127.0.0.1:{port}/ok.png", "http://127.0.0.1@example.com/ok.png", "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png", "http://169.254.169.254/", "http://127.0.0.1:99999/x",
    ],
)  # fmt: skip
def test_url_forms_that_are_not_the_named_host_are_refused(server, origin, url):
    body = {"model": "tiny", "input": url.format(port=origin.server_address[1])}
    r = httpx.post(server + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert_openai_error(r, 400, "url_not_allowed", "input")


@pytest.mark.integration
def test_named_addresses_make_a_name_reachable(origin):
    """`localhost` alone is refused (it resolves to loopback); naming its addresses too lets it through."""
    url = f"http://localhost:{origin.server_address[1]}/ok.png"
    alone = fetch.Policy.from_settings(Settings(url_fetch_hosts="localhost"))
    assert alone is not None
    with pytest.raises(UnreadableImage, match="resolves to"):
        asyncio.run(fetch.fetch(url, alone))
    both = fetch.Policy.from_settings(Settings(url_fetch_hosts="localhost,127.0.0.1,::1"))
    assert both is not None and asyncio.run(fetch.fetch(url, both)) == PICS[0]
    small = fetch.Policy.from_settings(Settings(url_fetch_hosts="127.0.0.1", url_fetch_max_bytes=1024))
    assert small is not None
    with pytest.raises(ImageTooLarge):
        asyncio.run(fetch.fetch(origin.url + "/ok.png", small))


# ------------------------------------------------------------------------------------------------ in-process
@pytest.mark.unit
@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False), ("127.255.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
        ("192.168.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
        ("224.0.0.1", False), ("255.255.255.255", False), ("240.0.0.1", False), ("::1", False), ("::", False),
        ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False), ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False),
        ("2002:7f00:1::1", False), ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo of 127.0.0.1
    ],
)  # fmt: skip
def test_address_rules(address, public):
    ip = ipaddress.ip_address(address)
    assert fetch.is_public(ip) is public
    nothing_named = fetch.Policy(frozenset({"example.com"}), (), (), 1024, 1.0, 0)
    assert nothing_named.address_allowed(ip) is public


@pytest.mark.unit
def test_allow_list_parsing():
    assert fetch.Policy.from_settings(Settings()) is None  # off by default
    p = fetch.Policy.from_settings(Settings(url_fetch_hosts=" Images.Example.com., *.cdn.test, 10.0.0.0/8, [::1] "))
    assert p is not None
    assert p.host_allowed("images.example.com") and p.host_allowed("a.b.cdn.test")
    assert not p.host_allowed("cdn.test") and not p.host_allowed("example.com") and not p.host_allowed("evilcdn.test")
    assert p.host_allowed("10.9.8.7") and p.host_allowed("::1") and not p.host_allowed("11.0.0.1")
    assert p.address_allowed(ipaddress.ip_address("10.1.1.1")) and p.address_allowed(ipaddress.ip_address("::1"))
    assert p.address_allowed(ipaddress.ip_address("::ffff:10.1.1.1"))  # the mapped form of a named address
    assert not p.address_allowed(ipaddress.ip_address("192.168.1.1"))


@pytest.mark.unit
def test_decimal_name_resolving_to_loopback_is_refused():
    """A name on the list that resolves (here: as inet_aton reads it) to loopback is refused by its address."""
    p = fetch.Policy.from_settings(Settings(url_fetch_hosts="2130706433"))
    assert p is not None and p.host_allowed("2130706433")
    with pytest.raises(UnreadableImage, match="resolves to 127.0.0.1"):
        asyncio.run(fetch.fetch("http://2130706433:9/x.png", p))


@pytest.fixture(scope="module")
def app(make_settings):
    s = make_settings(max_wait_ms=0, max_images_per_request=4, max_body_bytes=256 * 1024,
                 log_level="critical")  # fmt: skip
    with app_client(s) as c:
        yield c


GOOD = uri(PICS[0])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "tiny", "input": [GOOD] * 10_000}, 413, "body_too_large", None),  # over max_body_bytes
        ({"model": "tiny", "input": ["x"] * 5000}, 413, "too_many_images", "input"),
        ({"model": "tiny", "input": []}, 400, "no_image", "input"),
        ({"model": "tiny", "input": ["data:image/png;base64,!!!!"]}, 400, "bad_base64", "input"),
        ({"model": "tiny", "input": ["data:image/png,rawbytes"]}, 400, "bad_data_uri", "input"),
        ({"model": "tiny", "input": ["data:image/png;base64"]}, 400, "bad_data_uri", "input"),
        ({"model": "tiny", "input": ["data:text/plain;base64,aGVsbG8="]}, 415, "unsupported_type", "input"),
        ({"model": "tiny", "input": [uri(b"hello, not an image")]}, 415, None, "input"),
        ({"model": "tiny", "input": [uri(PICS[0][:60])]}, 400, None, "input"),  # a truncated PNG
        ({"model": "tiny", "input": [GOOD, ""]}, 400, None, "input"),
        ({"model": "tiny", "input": "http://127.0.0.1/x.png"}, 400, "url_input_disabled", "input"),
        ({"model": "tiny", "input": [[1, 2, 3]]}, 422, "bad_parameter", "input"),
        ({"model": "tiny", "input": 42}, 422, "bad_parameter", "input"),
        ({"input": GOOD}, 422, "bad_parameter", "model"),
        ({"model": "tiny", "input": GOOD, "temperature": 1}, 422, "bad_parameter", "temperature"),
        ({"model": "tiny", "input": GOOD, "encoding_format": "int8"}, 422, "bad_parameter", "encoding_format"),
        ({"model": "tiny", "input": GOOD, "mask_ratio": 1.0}, 422, "bad_parameter", "mask_ratio"),
        ({"model": "tiny", "input": GOOD, "pooling": "patches"}, 422, "bad_parameter", "pooling"),
        ({"model": "tiny", "input": GOOD, "dimensions": 0}, 422, "bad_parameter", "dimensions"),
        ({"model": "tiny", "input": GOOD, "user": "u" * 70_000}, 413, "parameter_too_large", "user"),
        ({"model": "x" * 201, "input": GOOD}, 422, "bad_parameter", "model"),
        ({"model": "nope", "input": GOOD}, 404, "unknown_model", "model"),
    ],
)
def test_hostile_bodies_are_clear_4xx(app, body, status, code, param):
    err = assert_openai_error(app.post("/v1/embeddings", json=body), status, code, param)
    if isinstance(body.get("input"), list) and len(body["input"]) == 2:
        assert err["message"].startswith("input[1]: "), err


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "ctype", "status", "code"),
    [
        (b"not json", "application/json", 400, "bad_json"),
        (b"[1, 2]", "application/json", 400, "bad_json"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "bad_json"),
        (b'{"model": "tiny", "input": "' + b"A" * 4 + b'"', "application/json", 400, "bad_json"),
        (PICS[0], "image/png", 415, "unsupported_type"),
        (b"model=tiny", "", 415, "unsupported_type"),
    ],
)
def test_bad_envelopes_are_clear_4xx(app, content, ctype, status, code):
    headers = {"Content-Type": ctype} if ctype else {}
    assert_openai_error(app.post("/v1/embeddings", content=content, headers=headers), status, code)


@pytest.mark.unit
def test_other_paths_and_methods_keep_their_shapes(app):
    """OpenAI's shape is this route's only: a 405 here is reshaped, /v1/embed's errors are not."""
    assert_openai_error(app.get("/v1/embeddings"), 405, "method_not_allowed")
    r = app.post("/v1/embed", content=b"x", headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and set(r.json()["error"]) == {"status", "code", "message"}


@pytest.mark.unit
def test_in_process_answer_shape_and_seed(app):
    r = app.post("/v1/embeddings", json={"model": "tiny", "input": GOOD, "mask_ratio": 0.25, "pooling": "mean"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"} and body["usage"] == {"prompt_tokens": 12,
                                                                                  "total_tokens": 12}  # fmt: skip
    seed = int(r.headers["X-MAE-Seed"])  # drawn, and echoed so the mask can be repeated
    again = app.post("/v1/embeddings", json={"model": "tiny", "input": GOOD, "mask_ratio": 0.25, "pooling": "mean",
                                             "seed": seed})  # fmt: skip
    close(again.json()["data"][0]["embedding"], body["data"][0]["embedding"])
    openapi = app.get("/openapi.json").json()["paths"]["/v1/embeddings"]["post"]
    assert "application/json" in openapi["requestBody"]["content"] and "404" in openapi["responses"]
