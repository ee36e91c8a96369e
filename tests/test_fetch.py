"""weights.fetch, offline: the table, download + verification through httpx.MockTransport, and the conversion."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from model import formats as checkpoint
from model.config import CONFIGS, get_config
from model.mae import MAE
from weights import fetch as wf
from weights.fetch import FetchError, RemoteFile, Source

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------------------------------------------- the table
EXPECTED_OFFICIAL = {
    "mae_visualize_vit_base": "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_base.pth",
    "mae_visualize_vit_large": "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth",
    "mae_visualize_vit_huge": "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_huge.pth",
    "mae_visualize_vit_large_ganloss": "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large_ganloss.pth",
    "mae_pretrain_vit_base": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    "mae_pretrain_vit_large": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
    "mae_pretrain_vit_huge": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth",
}


def test_table_official_urls_architectures_and_licence() -> None:
    assert set(EXPECTED_OFFICIAL) | {f"facebook/vit-mae-{s}" for s in ("base", "large", "huge")} == set(wf.SOURCES)
    for name, url in EXPECTED_OFFICIAL.items():
        s = wf.SOURCES[name]
        assert s.weights_url == url and len(s.files) == 1 and len(s.files[0]) == 1
        assert s.licence.startswith("CC-BY-NC 4.0")
        assert s.architecture in CONFIGS
        assert s.has_decoder == name.startswith("mae_visualize")  # mae_pretrain_* are encoder-only
        size = name.split("_vit_")[1].split("_")[0]
        assert {"base": "base_patch16", "large": "large_patch16", "huge": "huge_patch14"}[size] in s.architecture
    # The README's md5 prefixes.
    assert [wf.SOURCES[f"mae_pretrain_vit_{s}"].files[0][0].md5_prefix for s in ("base", "large", "huge")] == [
        "8cad7c",
        "b8b06e",
        "9bdbb0",
    ]


def test_table_hugging_face_entries() -> None:
    for size in ("base", "large", "huge"):
        s = wf.SOURCES[f"facebook/vit-mae-{size}"]
        (config,), (pre,), weights = s.files
        assert config.url == f"https://huggingface.co/facebook/vit-mae-{size}/resolve/main/config.json"
        assert pre.url == f"https://huggingface.co/facebook/vit-mae-{size}/resolve/main/preprocessor_config.json"
        assert weights[0].url == f"https://huggingface.co/facebook/vit-mae-{size}/resolve/main/model.safetensors"
        assert s.has_decoder and s.kind == "hf" and "CC-BY-NC 4.0" in s.licence
        assert get_config(s.architecture).embed_dim == {"base": 768, "large": 1024, "huge": 1280}[size]


def test_list_prints_every_name_and_the_licence(capsys) -> None:
    wf.main(["--list"])
    out = capsys.readouterr().out
    assert all(name in out for name in wf.SOURCES)
    assert "CC-BY-NC 4.0" in out and "encoder-only" in out


# ---------------------------------------------------------------------------------------------------- download
def serve(routes: dict[str, bytes | Callable[[httpx.Request], httpx.Response]]) -> httpx.Client:
    """A client whose transport answers from `routes` (url -> body or handler); 404 otherwise."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        seen.append(url)
        hit = routes.get(url)
        if hit is None:
            return httpx.Response(404)
        return hit(request) if callable(hit) else httpx.Response(200, content=hit)

    client = wf.make_client(httpx.MockTransport(handler))
    client.seen = seen  # type: ignore[attr-defined]
    return client


URL = "https://example.invalid/w.pth"
BODY = b"weights" * 1000
SHA = hashlib.sha256(BODY).hexdigest()


def test_download_verifies_and_renames(tmp_path: Path) -> None:
    dest = tmp_path / "w.pth"
    path, sha = wf.download(RemoteFile("w.pth", URL, sha256=SHA, size=len(BODY)), dest, serve({URL: BODY}))
    assert path == dest and dest.read_bytes() == BODY and sha == SHA
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temporary file left
    # A second call reuses the verified file without a request.
    client = serve({URL: BODY})
    wf.download(RemoteFile("w.pth", URL, sha256=SHA), dest, client, progress=False)
    assert client.seen == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "remote, why",
    [
        (RemoteFile("w.pth", URL, sha256="0" * 64), "sha256"),
        (RemoteFile("w.pth", URL, size=len(BODY) + 1), "size"),
        (RemoteFile("w.pth", URL, md5_prefix="ffffff"), "md5"),
    ],
)
def test_download_refuses_a_mismatch_and_leaves_nothing(tmp_path: Path, remote: RemoteFile, why: str) -> None:
    with pytest.raises(FetchError, match=why):
        wf.download(remote, tmp_path / "w.pth", serve({URL: BODY}), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_accepts_the_right_md5_prefix(tmp_path: Path) -> None:
    prefix = hashlib.md5(BODY).hexdigest()[:6]
    wf.download(RemoteFile("w.pth", URL, md5_prefix=prefix), tmp_path / "w.pth", serve({URL: BODY}), progress=False)
    assert (tmp_path / "w.pth").read_bytes() == BODY


def test_broken_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise httpx.ReadError("connection reset")

    client = serve({URL: lambda r: httpx.Response(200, content=chunks())})
    with pytest.raises(FetchError, match="ReadError"):
        wf.download(RemoteFile("w.pth", URL), tmp_path / "w.pth", client, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_errors(tmp_path: Path) -> None:
    client = serve({URL: lambda r: httpx.Response(500)})
    with pytest.raises(FetchError, match="HTTP 500"):
        wf.download(RemoteFile("w.pth", URL), tmp_path / "w.pth", client, progress=False)
    with pytest.raises(wf.NotFound):
        wf.download(RemoteFile("w.pth", URL + "x"), tmp_path / "w.pth", client, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_hub_redirect_advertised_sha256_and_404_fallback(tmp_path: Path) -> None:
    """Like the hub: resolve/ answers 302 + X-Linked-Etag (the LFS sha256); the first alternative is missing."""
    first = "https://huggingface.co/x/resolve/main/model.safetensors"
    second = "https://huggingface.co/x/resolve/refs%2Fpr%2F1/model.safetensors"
    cdn = "https://cdn.example.invalid/blob"

    def redirect(etag: str) -> Callable[[httpx.Request], httpx.Response]:
        return lambda r: httpx.Response(302, headers={"location": cdn, "x-linked-etag": f'"{etag}"'})

    alts = (RemoteFile("model.safetensors", first), RemoteFile("model.safetensors", second))
    path, sha, used = wf.download_slot(alts, tmp_path, serve({second: redirect(SHA), cdn: BODY}), progress=False)
    assert used.url == second and sha == SHA and path.read_bytes() == BODY

    bad = tmp_path / "bad"
    with pytest.raises(FetchError, match="advertised by the hub"):
        wf.download_slot(alts, bad, serve({second: redirect("1" * 64), cdn: BODY}), progress=False)
    assert list(bad.iterdir()) == []
    with pytest.raises(FetchError, match="none of the alternatives"):
        wf.download_slot(alts, bad, serve({}), progress=False)


# ---------------------------------------------------------------------------------------------------- convert
def official_layout_bytes(has_decoder: bool = True) -> bytes:
    """A tiny checkpoint as facebookresearch/mae writes them: torch.save({'model': state_dict})."""
    torch.manual_seed(0)
    model = MAE(get_config("mae_test").replace(has_decoder=has_decoder))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    return buf.getvalue()


def tiny_source(url: str = URL, has_decoder: bool = True, arch: str = "mae_test") -> Source:
    return Source("tiny_official", arch, has_decoder, ((RemoteFile("tiny.pth", url),),), wf.CC_BY_NC, "test")


@pytest.mark.parametrize("has_decoder", [True, False], ids=["visualize-like", "pretrain-like encoder-only"])
def test_fetch_downloads_and_converts_an_official_layout_file(tmp_path: Path, has_decoder: bool) -> None:
    body = official_layout_bytes(has_decoder)
    sources = {"tiny_official": tiny_source(has_decoder=has_decoder)}
    raw = tmp_path / "raw" / "tiny_official" / "tiny.pth"
    result = wf.fetch("tiny_official", tmp_path, client=serve({URL: body}), sources=sources, progress=False)
    assert result.path == tmp_path / "tiny_official.safetensors" and raw.read_bytes() == body
    assert result.sha256 == checkpoint.sha256_of(result.path)
    loaded = checkpoint.load_own(result.path)
    assert loaded.config.embed_dim == 32 and loaded.config.has_decoder == has_decoder
    want = torch.load(io.BytesIO(body), weights_only=True)["model"]
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-3, atol=1e-4, msg=k)  # stored as fp16
    with safe_open(str(result.path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("patch_embed.proj.weight").dtype == torch.float16
    assert meta["source"] == "tiny_official" and "CC-BY-NC" in meta["licence"]
    assert json.loads(meta["config"])["embed_dim"] == 32


def test_fetch_refuses_a_file_of_the_wrong_architecture(tmp_path: Path) -> None:
    sources = {"tiny_official": tiny_source(arch="mae_vit_base_patch16")}
    with pytest.raises(FetchError, match="not a mae_vit_base_patch16"):
        wf.fetch("tiny_official", tmp_path, client=serve({URL: official_layout_bytes()}), sources=sources)
    assert not (tmp_path / "tiny_official.safetensors").exists()
    # An encoder-only file where the table promises a decoder is refused too.
    sources = {"tiny_official": tiny_source(has_decoder=True)}
    body = official_layout_bytes(has_decoder=False)
    with pytest.raises(FetchError, match="has_decoder False != True"):
        wf.fetch("tiny_official", tmp_path / "b", client=serve({URL: body}), sources=sources, progress=False)


def test_cli_prints_the_licence_and_sha(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(wf.SOURCES, "tiny_official", tiny_source())
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=official_layout_bytes()))
    wf.main(["tiny_official", "--out", str(tmp_path), "--no-progress"], transport=transport)
    out = capsys.readouterr().out
    assert out.count("NOT for commercial use") == 2  # before and after
    assert f"sha256 {checkpoint.sha256_of(tmp_path / 'tiny_official.safetensors')}" in out


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unknown weights"):
        wf.fetch("nope", tmp_path, client=serve({}))
    with pytest.raises(SystemExit, match="unknown weights"):
        wf.main(["nope"])
