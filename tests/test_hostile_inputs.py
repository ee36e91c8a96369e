"""Hostile input: every request below is answered with its documented 4xx (or a correct 200), never a 5xx, a hang
or a crash. Also the access rules: API keys on /v1, the open routes, CORS.

Image policy under test (README "Hardening"): PNG, JPEG and WebP only, sniffed from the bytes (the declared type
only has to be one of the three); one frame; width x height checked against MAE_MAX_IMAGE_PIXELS from the header,
before any pixel is decoded; greyscale, palette, CMYK and 16-bit are converted to 8-bit RGB, alpha composited on
white; data after the image's end is ignored (the answer is always a freshly encoded image, never the input).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.main import create_app
from app.settings import Settings
from tests.serving import assert_error, image_bytes, live_server

pytestmark = pytest.mark.integration

PIXEL_CAP = 1_000_000  # far below the 8000 x 8000 bomb, above every legitimate test image
SEEN: collections.Counter = collections.Counter()  # status -> count, reported at the end of the module


def hostile_client(weights, **changes) -> TestClient:
    s = Settings(weights=str(weights), max_wait_ms=0, max_image_pixels=PIXEL_CAP, max_images_per_request=4, **changes)
    return TestClient(create_app(s, load_in_background=False), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(weights):
    with hostile_client(weights, max_body_bytes=2 * 1024 * 1024) as c:
        yield c
    print(f"\nhostile inputs: {sum(SEEN.values())} requests, statuses {dict(sorted(SEEN.items()))}")
    assert not [s for s in SEEN if s >= 500]


def answered(r: httpx.Response, status: int | set[int], code: str | set[str] | None = None) -> httpx.Response:
    """The answer is the expected status, and an error answer has the one documented shape."""
    SEEN[r.status_code] += 1
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error(r, status, code)
    else:
        assert r.status_code in ({status} if isinstance(status, int) else status), (r.status_code, r.text[:300])
    return r


def raw(c, data: bytes, ctype: str | bytes | None = "image/png", path: str = "/v1/reconstruct", **kw) -> httpx.Response:
    headers = {"Content-Type": ctype} if ctype else {}
    return c.post(path, content=data, headers=headers, **kw)


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w: int, h: int, depth: int, colour: int, idat: bytes) -> bytes:
    """A PNG from its parts: colour 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zero_png(side: int) -> bytes:
    """side x side greyscale zeros, compressed row by row (never held whole): ~1000:1."""
    z, row = zlib.compressobj(9), b"\0" * (side + 1)
    return png(side, side, 8, 0, b"".join(z.compress(row) for _ in range(side)) + z.flush())


def uniform_png16(value: tuple[int, ...], colour: int, side: int = 8) -> bytes:
    px = struct.pack(">" + "H" * len(value), *value)
    return png(side, side, 16, colour, zlib.compress((b"\0" + px * side) * side))


def original_view(c, data: bytes, ctype: str = "image/png") -> np.ndarray:
    """What the model was given: the 'original' view is the preprocessed input (32 x 32 RGB)."""
    r = answered(raw(c, data, ctype, params={"view": "original", "mask_ratio": 0}), 200)
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)


SMOOTH = Image.fromarray(np.linspace(0, 255, 40 * 48 * 3).reshape(40, 48, 3).astype(np.uint8))
PNG, JPEG, WEBP = save(SMOOTH, "PNG"), save(SMOOTH, "JPEG", quality=95), save(SMOOTH, "WEBP")


# ------------------------------------------------------------------------------------------------ bombs and caps
def test_decompression_bombs_are_refused_from_the_header(client, monkeypatch):
    import PIL.ImageFile

    decoded = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda im: decoded.append(im.format) or real_load(im))
    header_only = png(100_000, 100_000, 8, 2, zlib.compress(b"\0" * 1000))
    inflating = zero_png(8000)  # a real, complete PNG: 64 Mpx of zeros in ~60 KB
    assert len(inflating) < 100_000
    jpeg = bytearray(save(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # SOF0: height, width
    big_real_jpeg = save(Image.new("RGB", (1200, 1000), (200, 10, 10)), "JPEG")  # 1.2 Mpx > the cap
    for data, ctype in [
        (header_only, "image/png"),
        (inflating, "image/png"),
        (bytes(jpeg), "image/jpeg"),
        (big_real_jpeg, "image/jpeg"),
    ]:
        t = time.monotonic()
        answered(raw(client, data, ctype), 413, "too_many_pixels")
        answered(raw(client, data, ctype, path="/v1/embed"), 413, "too_many_pixels")
        assert time.monotonic() - t < 5
    webp = bytearray(WEBP)  # VP8 key frame header: 14-bit width and height after the start code 9d 01 2a
    start = webp.index(b"\x9d\x01\x2a")
    webp[start + 3 : start + 7] = struct.pack("<HH", 16000, 16000)
    answered(raw(client, bytes(webp), "image/webp"), {400, 413}, {"too_many_pixels", "undecodable"})
    assert decoded == [], "a pixel decoder ran for an image over the cap"


def test_eps_and_other_plugins_are_never_reached(client, monkeypatch):
    """Image.open gets formats=[the sniffed format]: no EPS (Ghostscript), TIFF, PSD... parser ever sees a byte."""
    import PIL.EpsImagePlugin
    import PIL.Image

    opened: list = []
    real_open = PIL.Image.open

    def spy(fp, mode="r", formats=None):
        opened.append(formats)
        return real_open(fp, mode, formats)

    def forbidden(*a, **k):
        raise AssertionError("the EPS plugin / Ghostscript was reached")

    monkeypatch.setattr(PIL.Image, "open", spy)
    monkeypatch.setattr(PIL.EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", forbidden)
    eps = save(SMOOTH, "EPS")
    answered(raw(client, eps, "image/png"), 415, "unsupported_type")
    answered(raw(client, b"\xc5\xd0\xd3\xc6" + eps[4:], "image/jpeg"), 415, "unsupported_type")  # DOS EPS
    answered(raw(client, b"\x89PNG\r\n\x1a\n" + eps, "image/png"), 400, "undecodable")  # PNG magic, EPS body
    answered(raw(client, b"\xff\xd8\xff" + eps, "image/jpeg"), 400, "undecodable")
    answered(raw(client, PNG), 200)
    answered(raw(client, JPEG, "image/jpeg"), 200)
    assert opened and all(f in (["PNG"], ["JPEG"]) for f in opened), opened


# ------------------------------------------------------------------------------------------------ broken files
@pytest.mark.parametrize("name", ["png", "jpeg", "webp", "progressive-jpeg"])
def test_truncated_files(client, name):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    fmt, kw = {
        "png": ("PNG", {}),
        "jpeg": ("JPEG", {}),
        "webp": ("WEBP", {}),
        "progressive-jpeg": ("JPEG", {"progressive": True}),
    }[name]
    data = save(noise, fmt, **kw)  # noise: pixel data to the very end, so every cut below loses pixels
    for frac in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95):
        cut = data[: int(len(data) * frac)]
        expect = {400, 415} if len(cut) < 12 else 400
        answered(raw(client, cut), expect, {"empty_image", "unsupported_type", "undecodable"})
    # within the last bytes every pixel may be there (a missing IEND / EOI): a correct image or a 400, never 5xx
    for back in (1, 4, 12):
        answered(raw(client, data[:-back]), {200, 400})


def test_corrupt_files(client):
    rng = np.random.default_rng(1)
    for data in (PNG, JPEG, WEBP):
        for _ in range(15):
            d = bytearray(data)
            for pos in rng.integers(12, len(d), size=4):
                d[pos] = int(rng.integers(256))
            # JPEG and lossy WebP decoders conceal damage (200); PNG's CRCs refuse it (400)
            answered(raw(client, bytes(d)), {200, 400}, "undecodable")
    bad_crc = bytearray(PNG)
    bad_crc[29] ^= 0xFF  # inside IHDR's CRC
    answered(raw(client, bytes(bad_crc)), 400, "undecodable")
    answered(raw(client, b"\x89PNG\r\n\x1a\n" + b"\0" * 100), 400, "undecodable")
    answered(raw(client, png(0, 0, 8, 2, b"")), 400, "undecodable")
    answered(raw(client, png(4, 4, 8, 2, b"not zlib at all")), 400, "undecodable")
    answered(raw(client, png(4, 4, 8, 2, zlib.compress(b"\0" * 5))), 400, "undecodable")  # too few rows
    answered(raw(client, png(4, 4, 7, 2, zlib.compress(b"\0" * 100))), 400, "undecodable")  # no such depth
    answered(raw(client, b"\xff\xd8\xff\xd9"), 400, "undecodable")
    answered(raw(client, b"RIFF\xff\xff\xff\xffWEBPVP8 junk"), 400, "undecodable")


def test_polyglots(client):
    zip_tail = b"PK\x03\x04" + b"\0" * 26 + b"evil.html<script>alert(1)</script>" + b"PK\x05\x06" + b"\0" * 18
    for host in (PNG, JPEG):
        for tail in (zip_tail, b"<html><script>alert(1)</script></html>"):
            r = answered(raw(client, host + tail), 200)  # trailing data is ignored...
            assert r.headers["content-type"] == "image/png" and b"PK\x03\x04" not in r.content
            assert b"<script>" not in r.content  # ...and never echoed: the answer is a fresh encode
    pdf = b"%PDF-1.4\n1 0 obj<</Type/XObject/Subtype/Image/Filter/DCTDecode>>stream\n"
    answered(raw(client, pdf + JPEG + b"\nendstream endobj\n%%EOF", "image/jpeg"), 415, "unsupported_type")
    answered(raw(client, b"<html>" + PNG), 415, "unsupported_type")
    answered(raw(client, save(SMOOTH.convert("P"), "GIF") + zip_tail, "image/png"), 415, "unsupported_type")


def frames(n: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (80 * i, 0, 255 - 80 * i)) for i in range(n)]


def psd_header() -> bytes:
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 16, 16, 8, 3) + b"\0" * 64


DISALLOWED = {
    "eps": lambda: save(SMOOTH, "EPS"),
    "tiff": lambda: save(SMOOTH, "TIFF"),
    "pdf": lambda: save(SMOOTH, "PDF"),
    "psd": psd_header,
    "bmp": lambda: save(SMOOTH, "BMP"),
    "gif": lambda: save(SMOOTH.convert("P"), "GIF"),
    "ico": lambda: save(SMOOTH, "ICO"),
    "jpeg2000": lambda: save(SMOOTH, "JPEG2000"),
    "qoi": lambda: save(SMOOTH, "QOI"),
    "ppm": lambda: save(SMOOTH, "PPM"),
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
    "animated-gif": lambda: save(frames()[0], "GIF", save_all=True, append_images=frames()[1:]),
}
ANIMATED = {
    "apng": lambda: save(frames()[0], "PNG", save_all=True, append_images=frames()[1:]),
    "animated-webp": lambda: save(frames()[0], "WEBP", save_all=True, append_images=frames()[1:]),
}


@pytest.mark.parametrize("name", sorted(DISALLOWED) + sorted(ANIMATED))
def test_disallowed_formats(client, name):
    data = (DISALLOWED | ANIMATED)[name]()
    code = "animated" if name in ANIMATED else "unsupported_type"
    for ctype in ("image/png", "image/jpeg", "image/webp"):  # the declared type does not matter: the bytes do
        answered(raw(client, data, ctype), 415, code)
    answered(client.post("/v1/embed", files={"image": ("x.png", data, "image/png")}), 415, code)
    answered(client.post("/v1/embed", json={"image": base64.b64encode(data).decode()}), 415, code)


# ------------------------------------------------------------------------------------------------ conversions
def test_unusual_modes_are_converted_correctly(client):
    def flat(a: np.ndarray, rgb: tuple[int, int, int], tol: int = 2) -> bool:
        return bool(np.abs(a - np.array(rgb)).max() <= tol)

    # 16-bit greyscale: scaled, not clipped to white (nor a dark image blown up)
    for v16, v8 in [(0x0000, 0), (0x00C8, 0), (0x8000, 128), (0xC0C0, 192), (0xFFFF, 255)]:
        assert flat(original_view(client, uniform_png16((v16,), 0)), (v8, v8, v8)), v16
    assert flat(original_view(client, uniform_png16((0xFFFF, 0x8000, 0x0000), 2)), (255, 128, 0))
    assert flat(original_view(client, uniform_png16((0x8000, 0xFFFF), 4)), (128, 128, 128))  # 16-bit LA, opaque
    assert flat(original_view(client, uniform_png16((0xFFFF, 0, 0, 0x0000), 6)), (255, 255, 255))  # transparent
    # alpha composited on white
    assert flat(original_view(client, save(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")), (255, 255, 255))
    assert flat(original_view(client, save(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG")), (255, 127, 127))
    assert flat(original_view(client, save(Image.new("LA", (8, 8), (0, 0)), "PNG")), (255, 255, 255))
    assert flat(original_view(client, save(Image.new("LA", (8, 8), (40, 255)), "PNG")), (40, 40, 40))
    assert flat(
        original_view(client, save(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "WEBP", lossless=True)), (255,) * 3
    )
    # palette, with and without a transparent entry
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert flat(original_view(client, save(pal, "PNG")), (10, 200, 30))
    assert flat(original_view(client, save(pal, "PNG", transparency=1)), (255, 255, 255))
    # greyscale and bilevel
    assert flat(original_view(client, save(Image.new("L", (8, 8), 77), "PNG")), (77, 77, 77))
    assert flat(original_view(client, save(Image.new("1", (8, 8), 1), "PNG")), (255, 255, 255))
    assert flat(original_view(client, save(Image.new("L", (8, 8), 77), "JPEG"), "image/jpeg"), (77, 77, 77))
    # a multi-picture JPEG (MPO: Ultra HDR gain map, stereo pair) is a photo, not an animation: its first picture
    mpo = save(Image.new("RGB", (16, 16), (250, 0, 0)), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert flat(original_view(client, mpo, "image/jpeg"), (250, 0, 0), tol=6)
    # CMYK JPEG (Adobe, inverted on disk): the colour survives the round trip
    cmyk = save(Image.new("RGB", (16, 16), (200, 60, 30)).convert("CMYK"), "JPEG", quality=95)
    assert flat(original_view(client, cmyk, "image/jpeg"), (200, 60, 30), tol=6)


# ------------------------------------------------------------------------------------------------ transport
def test_empty_bodies_and_content_types(client):
    answered(raw(client, b""), 400, "empty_image")
    answered(client.post("/v1/embed", files={"image": ("x.png", b"", "image/png")}), 400, "empty_image")
    answered(client.post("/v1/embed", json={"image": ""}), 400, "empty_image")
    answered(client.post("/v1/embed", json={}), 400, "no_image")
    answered(client.post("/v1/embed", data={"seed": "1"}, files={"other": ("x", b"", "text/plain")}), 422)
    answered(raw(client, PNG, None), 415, "missing_content_type")
    for ctype in ("text/plain", "image/gif", "image/tiff", "application/octet-stream", "application/pdf", b"x/\xff"):
        answered(raw(client, PNG, ctype), 415, "unsupported_type")
    answered(raw(client, PNG, "image/jpeg"), 200)  # declared JPEG, sniffed PNG: decoded as what it is
    answered(raw(client, JPEG, "IMAGE/PNG; charset=binary"), 200)
    answered(client.post("/v1/embed", files={"image": ("a.html", PNG, "text/html")}), 200)
    answered(client.post("/v1/embed", files={"image": ("a.png", b"<html>", "image/png")}), 415, "unsupported_type")
    answered(raw(client, b"--x\r\n", "multipart/form-data"), 400, "bad_multipart")  # no boundary
    answered(raw(client, b"garbage", "multipart/form-data; boundary=x"), {400, 422})
    answered(client.post("/v1/embed", files={"image": ("a.png", PNG, "image/png")}, data={"image": "x"}), 422)


def test_body_cap_with_content_length_and_counts(weights):
    with hostile_client(weights, max_body_bytes=64 * 1024) as c:
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * (64 * 1024)
        answered(raw(c, big), 413, "body_too_large")
        answered(c.post("/v1/embed", json={"image": base64.b64encode(big).decode()}), 413, "body_too_large")
        answered(c.post("/v1/embed", files={"image": ("a.png", big, "image/png")}), 413, "body_too_large")
        small = image_bytes(8, 8)
        answered(c.post("/v1/embed", files=[("image", ("a.png", small, "image/png"))] * 5), 413, "too_many_images")
        answered(c.post("/v1/embed", files=[("image", ("a.png", small, "image/png"))] * 50), 413, "too_many_images")
        answered(c.post("/v1/embed", json={"images": [base64.b64encode(small).decode()] * 5}), 413, "too_many_images")
        answered(c.post("/v1/embed", json={"images": [""] * 5000}), 413, "too_many_images")
        fields = {f"f{i}": "1" for i in range(100)}
        answered(c.post("/v1/embed", data=fields, files={"image": ("a.png", small, "image/png")}), {400, 422})
        answered(c.post("/v1/embed", json={"images": [base64.b64encode(small).decode()] * 4}), 200)


def test_chunked_bodies_over_the_cap_through_a_real_server(make_settings):
    """No Content-Length: the BodyGuard middleware counts the bytes as they arrive and answers 413 mid-stream."""
    s = make_settings(max_body_bytes=64 * 1024, log_level="warning")
    with live_server(s) as (url, _), httpx.Client(base_url=url, timeout=20) as h:
        sent = collections.Counter()

        def stream(head: bytes, total: int, tag: str):
            yield head
            chunk = b"\0" * 8192
            for _ in range(total // len(chunk)):
                sent[tag] += len(chunk)
                yield chunk

        bodies = {
            "raw": (b"\x89PNG\r\n\x1a\n", "image/png"),
            "json": (b'{"image": "' + b"A" * 100, "application/json"),
            "multipart": (
                b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n",
                "multipart/form-data; boundary=xx",
            ),
        }
        outcomes = []
        for tag, (head, ctype) in bodies.items():
            for total in (200 * 1024, 50 * 1024 * 1024):
                t = time.monotonic()
                try:
                    r = h.post("/v1/embed", content=stream(head, total, tag), headers={"Content-Type": ctype})
                    answered(r, 413, "body_too_large")
                    assert r.headers["connection"] == "close"
                    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"]
                    outcomes.append(413)
                except httpx.TransportError:  # the server answered and closed while we were still sending
                    outcomes.append("closed")
                assert time.monotonic() - t < 15
                assert sent[tag] < 16 * 1024 * 1024  # the server stopped reading: the rest never left the client
                sent[tag] = 0
        print("chunked outcomes", outcomes)
        assert outcomes.count(413) >= 3, outcomes
        assert h.get("/healthz").status_code == 200 and h.get("/readyz").status_code == 200
        ok = h.post("/v1/embed", content=image_bytes(), headers={"Content-Type": "image/png"})
        assert ok.status_code == 200


# ------------------------------------------------------------------------------------------------ parameters
JUNK = [
    *("nan", "NaN", "inf", "-inf", "-1", "1", "1.5", "1e999", str(2**70), "9" * 5000, "", " ", "0x10", "1_0"),
    *("true", "[]", "{}", "%00", "'; DROP TABLE x;--", "a" * 300, "\U0001f4a5" * 50, "\u0661", "\u00bd", "\x00"),
    "\u202e1",
]
PARAMS = {
    "/v1/reconstruct": ["mask_ratio", "seed", "mask", "view", "format", "model", "resize"],
    "/v1/embed": ["mask_ratio", "seed", "mask", "pool", "format", "dtype", "model", "resize"],
}
# The junk a parameter legitimately takes: "1" is a seed and a mask index, "1_0" is pydantic's (Python's) way to
# write the seed 10, an empty / blank mask hides nothing. Everything else is a 422.
ACCEPTED = {("seed", "1"), ("seed", "1_0"), ("mask", "1"), ("mask", ""), ("mask", " ")}


def takes(name: str, value: object) -> bool:
    """JSON values of the wrong type that still mean something: null = not given, true = 1, a list mask."""
    return (value is None and name in ("seed", "mask", "model")) or (name, value) in (("seed", True), ("mask", [1]))


@pytest.mark.parametrize("path", sorted(PARAMS))
def test_junk_in_every_parameter_and_form(client, path):
    small = image_bytes(8, 8)
    b64 = base64.b64encode(small).decode()
    for name in PARAMS[path]:
        for junk in JUNK:
            expect = {200, 422} if (name, junk) in ACCEPTED else 422
            answered(raw(client, small, path=path, params={name: junk}), expect)
            answered(client.post(path, files={"image": ("a.png", small, "image/png")}, data={name: junk}), expect)
            answered(client.post(path, json={"image": b64, name: junk}), expect)
        for wrong in (None, True, 1e308, -(2**80), [1], {"a": 1}, [[]], float("inf")):
            body = json.dumps({"image": b64, name: wrong}, allow_nan=True)
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            answered(r, {200, 422} if takes(name, wrong) else 422)
    answered(raw(client, small, path=path, params=[("seed", "1"), ("seed", "2")]), 422)  # given twice
    answered(client.post(path, json={"image": b64, "seed": 1}, params={"seed": "2"}), 422)  # differently twice


def test_masks_out_of_range_duplicated_all_negative(client):
    for bad in ["16", "-1", "1,1", "0,0,0", ",".join(map(str, range(16))), str(10**30), "1,,x", "\u0661", "1_0", "+"]:
        answered(raw(client, PNG, params={"mask": bad}), 422, {"bad_mask", "bad_parameter"})
        answered(raw(client, PNG, path="/v1/embed", params={"mask": bad}), 422, {"bad_mask", "bad_parameter"})
    for bad in [[16], [-1], [1, 1], list(range(16)), [10**30], [True], [1.0], ["1"], list(range(10**5))]:
        r = client.post("/v1/reconstruct", json={"image": base64.b64encode(PNG).decode(), "mask": bad})
        answered(r, 422, {"bad_mask", "bad_parameter"})
    # an empty mask hides nothing: a valid request with MSE 0 and no PSNR
    r = answered(raw(client, PNG, params={"mask": ",", "format": "json"}), 200)
    assert r.json()["mask"] == [] and r.json()["mse"] == 0 and r.json()["psnr"] is None


def test_hostile_json(client):
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (
        deep,
        b'{"image": ' + deep + b"}",
        b'{"a": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
        b'{"seed": ' + b"9" * 5000 + b"}",
        b'{"image": "x", "mask": [' + b"9" * 5000 + b"]}",
        b"\xff\xfe\x00",
        b"",
        b"null",
        b"[]",
        b'"image"',
        b"NaN",
    ):
        answered(raw(client, body, "application/json", path="/v1/embed"), 400, "bad_json")
    b64 = base64.b64encode(image_bytes(8, 8)).decode()
    answered(client.post("/v1/embed", json={"image": b64, "images": [b64]}), 422)
    answered(client.post("/v1/embed", json={"image": b64, **{f"k{i}": i for i in range(10_000)}}), 422, "bad_parameter")
    answered(client.post("/v1/embed", json={"image": b64, "seed": {"a": [1] * 10_000}}), 422)
    answered(client.post("/v1/embed", json={"image": [b64]}), 422)


def test_base64_with_junk(client):
    good = base64.b64encode(PNG).decode()
    for junk in [good[:-2], "!!" + good, good + "?", good[:50] + "\n" + good[50:], "\u00e9" * 8, "====", "data:,", " "]:
        answered(client.post("/v1/embed", json={"image": junk}), 400, {"bad_base64", "empty_image"})
    answered(client.post("/v1/embed", json={"image": "data:image/png;base64," + good}), 200)
    answered(client.post("/v1/embed", json={"image": base64.b64encode(b"junk" * 10).decode()}), 415)
    # base64 is the request's envelope, checked before any image runs: one bad entry fails the request
    answered(client.post("/v1/embed", json={"images": [good, "@@@"]}), 400, "bad_base64")


def test_deadline_header_junk(client):
    for junk in ["nan", "inf", "-1", "0", "1e309", "abc", "", "3600001", b"\xc2\xbd", b"\xff"]:
        r = client.post("/v1/embed", content=PNG, headers={"Content-Type": "image/png", "X-MAE-Deadline-Ms": junk})
        answered(r, 422, "bad_parameter")


@pytest.mark.parametrize("http,oversized", [("h11", b"HTTP/1.1 400"), ("httptools", b"HTTP/1.1 431")])
def test_huge_request_heads_through_a_real_server(make_settings, http, oversized):
    """An oversized request head is refused before the app sees it: h11 stops at its own limit (400), the guarded
    httptools protocol (which has none) at MAE_MAX_HEADER_BYTES (431); a TLS hello is a 400 from either."""
    with live_server(make_settings(log_level="critical", http=http)) as (url, _):
        host, port = url.removeprefix("http://").split(":")

        def status_of(request: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                with contextlib.suppress(OSError):  # the server may answer and close before we are done
                    sock.sendall(request)
                return sock.recv(200)[:12]

        mb = 1024 * 1024
        for req, want in (
            (b"POST /v1/embed?mask=" + b"1," * (mb // 2) + b" HTTP/1.1\r\nHost: x\r\n\r\n", oversized),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * mb + b"\r\n\r\n", oversized),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * (mb // 8) + b"\r\n", oversized),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 100, b"HTTP/1.1 400"),  # TLS hello, plain port
        ):
            status = status_of(req)
            assert status == want, (status, req[:40])
            SEEN[int(status[9:12])] += 1
        assert httpx.get(url + "/healthz").status_code == 200


# ------------------------------------------------------------------------------------------------ auth and CORS
def v1_routes(c) -> list[tuple[str, str]]:
    """Every /v1 operation the app documents, so a new route is covered the day it is added."""
    paths = c.get("/openapi.json").json()["paths"]
    out = [(m.upper(), p) for p, ops in paths.items() if p.startswith("/v1") for m in ops]
    assert {p for _, p in out} >= {"/v1/reconstruct", "/v1/embed", "/v1/models"}
    return out


def call(c, method: str, path: str, auth: str | bytes | None):
    headers = {"Authorization": auth} if auth is not None else {}
    if method == "GET":
        return c.get(path, headers=headers)
    if path == "/v1/embeddings":  # OpenAI's request shape: JSON, the image as base64
        return c.post(path, json={"model": "tiny", "input": base64.b64encode(PNG).decode()}, headers=headers)
    return c.request(method, path, content=PNG, headers={"Content-Type": "image/png", **headers})


def test_every_v1_route_needs_a_key_and_the_open_routes_stay_open(weights):
    key1, key2 = "k1-" + "x" * 40, "second-key"
    with hostile_client(weights, api_keys=f"{key1}, {key2}") as c:
        routes = v1_routes(c)
        for method, path in routes:
            wrong = (None, "", "Bearer", "Bearer ", f"Basic {key1}", f"Bearer {key1[:-1]}", f"Bearer {key1}x")
            wrong += (f"Bearer {key2.upper()}", f"Bearer {key1},{key2}", b"Bearer \xff", f"Token {key2}")
            for auth in wrong:
                r = answered(call(c, method, path, auth), 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            for auth in (f"Bearer {key1}", f"bearer {key2}", f"BEARER {key2}"):
                assert answered(call(c, method, path, auth), 200)
        # 401 before anything else: no body parsing, no readiness or model information for strangers
        answered(c.post("/v1/embed", content=b"{", headers={"Content-Type": "application/json"}), 401)
        answered(c.post("/v1/embed", params={"model": "nope"}, content=b"x"), 401)
        for open_path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/docs"):
            r = c.get(open_path)
            assert r.status_code == 200 or (open_path == "/" and r.status_code == 404), open_path  # / needs static/
    with hostile_client(weights, api_keys=key1, metrics_require_key=True) as c:
        answered(c.get("/metrics"), 401, "unauthorized")
        assert c.get("/metrics", headers={"Authorization": f"Bearer {key1}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    with hostile_client(weights, metrics_require_key=True) as c:  # no keys configured: nothing to require
        assert c.get("/metrics").status_code == 200
        assert call(c, "GET", "/v1/models", None).status_code == 200


def test_openapi_declares_the_bearer_scheme_exactly_when_keys_are_on(weights):
    """So /docs "Try it out" can send the key: an HTTP bearer scheme on every /v1 operation, only with MAE_API_KEYS."""
    with hostile_client(weights, api_keys="k") as c:
        spec = c.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer", "description": "one of MAE_API_KEYS"}  # fmt: skip
        for method, path in v1_routes(c):
            assert spec["paths"][path][method.lower()]["security"] == [{"bearer": []}], path
        assert "security" not in spec["paths"]["/healthz"]["get"] and "security" not in spec["paths"]["/metrics"]["get"]
    with hostile_client(weights, api_keys="k", metrics_require_key=True) as c:
        assert c.get("/openapi.json").json()["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    with hostile_client(weights) as c:
        spec = c.get("/openapi.json").json()
        assert "securitySchemes" not in spec.get("components", {})
        assert not any("security" in op for ops in spec["paths"].values() for op in ops.values())


def test_cors_is_off_unless_origins_are_set(weights):
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with hostile_client(weights) as c:
        r = c.options("/v1/embed", headers=pre)
        assert "access-control-allow-origin" not in r.headers and r.status_code in (400, 405)
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with hostile_client(weights, cors_origins="https://app.example") as c:
        good = {**pre, "Origin": "https://app.example", "Access-Control-Request-Headers": "authorization"}
        r = c.options("/v1/embed", headers=good)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in r.headers
        r = c.options("/v1/embed", headers=pre)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
