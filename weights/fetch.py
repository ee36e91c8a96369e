"""Download published MAE weights and convert them to the project's format.

    python -m weights.fetch --list
    python -m weights.fetch mae_visualize_vit_base [--out DIR]     # or: mae-weights mae_visualize_vit_base

Sources (looked up in facebookresearch/mae):

* ``mae_visualize_vit_{base,large,huge,large_ganloss}``: encoder + decoder trained with pixel targets, the models
  of the official visualisation demo (demo/mae_visualize.ipynb downloads the large and large_ganloss files; base
  and huge sit in the same folder). These can reconstruct.
* ``mae_pretrain_vit_{base,large,huge}``: the "pre-trained checkpoint" table of the README: ENCODER ONLY (they
  embed, they cannot reconstruct). The README gives the first 6 hex digits of each file's md5; we check them.
* ``facebook/vit-mae-{base,large,huge}``: the Hugging Face port (config.json, preprocessor_config.json and the
  weights from the hub's resolve URLs; model.formats.load reads the folder). Only vit-mae-base has
  model.safetensors on main; for large the hub's own safetensors conversion lives on refs/pr/1, and huge has
  only pytorch_model.bin; the alternatives are tried in that order (a 404 moves on).

Integrity: no published sha256 or size is known for the official files (None in the table: not verified beyond
the README's md5 prefixes). For hub files the sha256 the hub advertises for the LFS object (X-Linked-Etag) is
checked when present. A download streams to a temporary file in the target folder and is renamed only once it
has been verified, so a failed or refused download leaves nothing behind.

LICENCE: Meta's official MAE weights are released under CC-BY-NC 4.0: NON-COMMERCIAL use only. The Hugging Face
cards say apache-2.0, but those weights are converted from the same official checkpoints, so treat them as
CC-BY-NC 4.0 too unless you have checked otherwise. Nothing fetched here is bundled with this project.

The HTTP transport is injectable (`fetch(..., client=...)`, `main(..., transport=...)`) so tests run offline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from model import formats as checkpoint
from model.config import get_config

OFFICIAL = "https://dl.fbaipublicfiles.com/mae"
HUB = "https://huggingface.co"
CC_BY_NC = "CC-BY-NC 4.0 (non-commercial use only)"
HF_LICENCE = (
    "CC-BY-NC 4.0 (non-commercial use only): the model card says apache-2.0, but the weights are converted from "
    "Meta's official CC-BY-NC 4.0 checkpoints"
)
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or conversion that did not succeed; the message says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to download. sha256 / size / md5_prefix are None where nothing is published (then not checked)."""

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    md5_prefix: str | None = None  # the facebookresearch/mae README prints the first 6 hex digits of the md5


@dataclass(frozen=True)
class Source:
    """A named checkpoint: `files` is a list of slots, each a tuple of alternatives tried in order on 404."""

    name: str
    architecture: str  # a name in model.config.CONFIGS
    has_decoder: bool
    files: tuple[tuple[RemoteFile, ...], ...]
    licence: str
    origin: str
    kind: str = "official"  # official | hf

    @property
    def weights_url(self) -> str:
        return self.files[-1][0].url

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def _official(name: str, folder: str, arch: str, decoder: bool, origin: str, md5: str | None = None) -> Source:
    f = RemoteFile(f"{name}.pth", f"{OFFICIAL}/{folder}/{name}.pth", md5_prefix=md5)
    return Source(name, arch, decoder, ((f,),), CC_BY_NC, origin)


def _hub(repo: str, arch: str, extra_weights: tuple[tuple[str, str], ...] = ()) -> Source:
    def resolve(filename: str, rev: str = "main") -> RemoteFile:
        return RemoteFile(filename, f"{HUB}/{repo}/resolve/{rev}/{filename}")

    weights = (resolve("model.safetensors"), *(resolve(fn, rev) for rev, fn in extra_weights))
    # preprocessor_config.json carries the pixel mean/std the loader applies; the weights come last.
    files = ((resolve("config.json"),), (resolve("preprocessor_config.json"),), weights)
    return Source(repo, arch, True, files, HF_LICENCE, f"huggingface.co/{repo}", "hf")


_DEMO = "facebookresearch/mae demo (pixel targets, with decoder)"
_README = "facebookresearch/mae README, pre-trained checkpoints (encoder only)"
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        _official("mae_visualize_vit_base", "visualize", "mae_vit_base_patch16", True, _DEMO),
        _official("mae_visualize_vit_large", "visualize", "mae_vit_large_patch16", True, _DEMO),
        _official("mae_visualize_vit_huge", "visualize", "mae_vit_huge_patch14", True, _DEMO),
        _official(
            "mae_visualize_vit_large_ganloss", "visualize", "mae_vit_large_patch16", True, _DEMO + ", + GAN loss"
        ),
        _official("mae_pretrain_vit_base", "pretrain", "mae_vit_base_patch16", False, _README, md5="8cad7c"),
        _official("mae_pretrain_vit_large", "pretrain", "mae_vit_large_patch16", False, _README, md5="b8b06e"),
        _official("mae_pretrain_vit_huge", "pretrain", "mae_vit_huge_patch14", False, _README, md5="9bdbb0"),
        _hub("facebook/vit-mae-base", "mae_vit_base_patch16"),
        _hub(
            "facebook/vit-mae-large",
            "mae_vit_large_patch16",
            (("refs%2Fpr%2F1", "model.safetensors"), ("main", "pytorch_model.bin")),
        ),
        _hub("facebook/vit-mae-huge", "mae_vit_huge_patch14", (("main", "pytorch_model.bin"),)),
    )
}


@dataclass
class FetchResult:
    name: str
    path: Path  # the converted file, in the project's format
    sha256: str
    licence: str
    raw: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- download
def make_client(transport: httpx.BaseTransport | None = None) -> httpx.Client:
    return httpx.Client(
        transport=transport,
        follow_redirects=True,  # the hub redirects to its CDN
        timeout=httpx.Timeout(30.0, read=120.0),
        headers={"User-Agent": "mae-serve-weights-fetch"},
    )


def _hub_sha256(response: httpx.Response) -> str | None:
    """The sha256 the Hugging Face hub advertises for an LFS file (X-Linked-Etag on the redirect), if any."""
    for r in (*response.history, response):
        etag = r.headers.get("x-linked-etag", "").strip('"').removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            return etag
    return None


class NotFound(FetchError):
    """The server answered 404: the caller may try an alternative."""


def download(
    remote: RemoteFile, dest: str | Path, client: httpx.Client, *, progress: bool = True, force: bool = False
) -> tuple[Path, str]:
    """Stream `remote` to `dest` through a temporary file; verify; rename. Returns (path, sha256).

    An existing `dest` is reused (and verified where a hash is known) unless `force`. A failed or refused download
    leaves neither `dest` nor a partial file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not force:
        sha = checkpoint.sha256_of(dest)
        if remote.sha256 is None or sha == remote.sha256:
            print(f"using {dest} (already downloaded; --force to fetch again)", file=sys.stderr)
            return dest, sha
        print(f"{dest}: sha256 {sha} does not match the expected {remote.sha256}; fetching again", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        try:
            with os.fdopen(fd, "wb") as out, client.stream("GET", remote.url) as r:
                if r.status_code == 404:
                    raise NotFound(f"{remote.url}: 404 not found")
                if r.status_code >= 400:
                    raise FetchError(f"{remote.url}: HTTP {r.status_code}")
                hub_sha = _hub_sha256(r)
                total = r.headers.get("content-length")
                encoded = r.headers.get("content-encoding", "identity") != "identity"
                with tqdm(
                    total=int(total) if total and not encoded else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=remote.filename,
                    disable=not progress,
                    file=sys.stderr,
                ) as bar:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
        except httpx.HTTPError as e:
            raise FetchError(f"{remote.url}: {type(e).__name__}: {e}") from e
        digest = sha.hexdigest()
        problems = []
        if total and not encoded and n != int(total):
            problems.append(f"got {n} bytes, the server announced {total} (truncated?)")
        if remote.size is not None and n != remote.size:
            problems.append(f"size {n} != expected {remote.size}")
        if remote.sha256 is not None and digest != remote.sha256:
            problems.append(f"sha256 {digest} != expected {remote.sha256}")
        if hub_sha is not None and digest != hub_sha:
            problems.append(f"sha256 {digest} != {hub_sha} advertised by the hub")
        if remote.md5_prefix is not None and not md5.hexdigest().startswith(remote.md5_prefix):
            problems.append(f"md5 {md5.hexdigest()} does not start with the published {remote.md5_prefix}")
        if problems:
            raise FetchError(f"{remote.url}: refused: " + "; ".join(problems))
        os.replace(tmp, dest)
        return dest, digest
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial or unverified file (also on Ctrl-C)
        raise


def download_slot(
    alternatives: tuple[RemoteFile, ...], folder: Path, client: httpx.Client, **kw: bool
) -> tuple[Path, str, RemoteFile]:
    """The first alternative the server has (404 -> next)."""
    missing = []
    for remote in alternatives:
        try:
            path, sha = download(remote, folder / remote.filename, client, **kw)
            return path, sha, remote
        except NotFound as e:
            missing.append(str(e))
    raise FetchError("none of the alternatives exists: " + "; ".join(missing))


# ---------------------------------------------------------------------------------------------------- convert
def _check_architecture(loaded: checkpoint.LoadedModel, source: Source) -> None:
    """Refuse a file whose shapes are not what the table says (a wrong or tampered download)."""
    want = get_config(source.architecture)
    got = loaded.config
    keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    diff = [f"{k} {getattr(got, k)} != {getattr(want, k)}" for k in keys if getattr(got, k) != getattr(want, k)]
    if got.has_decoder != source.has_decoder:
        diff.append(f"has_decoder {got.has_decoder} != {source.has_decoder}")
    if source.has_decoder:
        dk = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        diff += [f"{k} {getattr(got, k)} != {getattr(want, k)}" for k in dk if getattr(got, k) != getattr(want, k)]
    if diff:
        raise FetchError(f"{source.name}: the file is not a {source.architecture}: " + ", ".join(diff))


def convert(source: Source, raw: list[Path], out: Path) -> tuple[checkpoint.LoadedModel, str]:
    """Read the downloaded file(s) with model.formats.load and write the project's format (fp16)."""
    # HF: config.json sits beside the weights; the loader reads the folder.
    target = raw[-1].parent if source.kind == "hf" else raw[-1]
    try:
        loaded = checkpoint.load(target)
    except checkpoint.CheckpointError as e:
        raise FetchError(f"{source.name}: cannot read {target} (downloaded and kept): {e}") from e
    _check_architecture(loaded, source)
    extra = {"source": source.name, "source_url": source.weights_url, "licence": source.licence}
    sha = checkpoint.save(loaded.model, out, dtype=torch.float16, extra=extra)
    return loaded, sha


def licence_banner(source: Source) -> str:
    bar = "!" * 100
    return "\n".join(
        [
            bar,
            f"!! LICENCE of {source.name}: {source.licence}",
            "!! Meta's MAE weights (facebookresearch/mae) are CC-BY-NC 4.0: NOT for commercial use.",
            "!! Attribute He et al. 2021, 'Masked Autoencoders Are Scalable Vision Learners'. Do not commit or",
            "!! redistribute them with this project (which is Apache-2.0).",
            bar,
        ]
    )


def default_out() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mae-serve" / "weights"


def fetch(
    name: str,
    out_dir: str | Path | None = None,
    *,
    client: httpx.Client | None = None,
    sources: dict[str, Source] | None = None,
    progress: bool = True,
    force: bool = False,
    keep_raw: bool = True,
) -> FetchResult:
    """Download `name` into OUT/raw/<name>/, verify, convert to OUT/<name>.safetensors (fp16)."""
    table = SOURCES if sources is None else sources
    if name not in table:
        raise FetchError(f"unknown weights {name!r}; known: {', '.join(table)}")
    source = table[name]
    out = Path(out_dir) if out_dir is not None else default_out()
    raw_dir = out / "raw" / source.short_name
    own_client = client is None
    client = client or make_client()
    try:
        raw = []
        for slot in source.files:
            path, sha, remote = download_slot(slot, raw_dir, client, progress=progress, force=force)
            print(f"downloaded {remote.url}\n  -> {path}  sha256 {sha}", file=sys.stderr)
            raw.append(path)
    finally:
        if own_client:
            client.close()
    dest = out / f"{source.short_name}.safetensors"
    loaded, sha = convert(source, raw, dest)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    if not keep_raw:
        for p in raw:
            p.unlink(missing_ok=True)
    return FetchResult(source.name, dest, sha, source.licence, [] if not keep_raw else raw)


# ---------------------------------------------------------------------------------------------------- CLI
def format_table(sources: dict[str, Source] | None = None) -> str:
    table = SOURCES if sources is None else sources
    rows = [("name", "architecture", "decoder", "licence", "url (first alternative of the weights)")]
    for s in table.values():
        rows.append((s.name, s.architecture, "yes" if s.has_decoder else "NO", s.licence.split(":")[0], s.weights_url))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [
        "",
        "sha256/size: none published (not checked); mae_pretrain_*: the README's md5 prefix is checked;",
        "Hugging Face files: the sha256 the hub advertises is checked. mae_pretrain_* are encoder-only (no decoder).",
        "ALL of these are CC-BY-NC 4.0 (non-commercial) weights.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="a name from --list")
    ap.add_argument("--list", action="store_true", help="print the table of known weights")
    ap.add_argument("--out", default=None, help=f"folder for the result and raw/ downloads (default {default_out()})")
    ap.add_argument("--force", action="store_true", help="download again even if the raw file is there")
    ap.add_argument("--delete-raw", action="store_true", help="remove the downloaded files after conversion")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        print(format_table())
        if not args.list:
            ap.error("give a NAME (or --list)")
        return
    source = SOURCES.get(args.name)
    if source is None:
        raise SystemExit(f"unknown weights {args.name!r}; known: {', '.join(SOURCES)}")
    print(licence_banner(source))
    client = make_client(transport)
    try:
        result = fetch(
            args.name,
            args.out,
            client=client,
            progress=not args.no_progress,
            force=args.force,
            keep_raw=not args.delete_raw,
        )
    except FetchError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        client.close()
    print(f"wrote {result.path}\nsha256 {result.sha256}")
    print(licence_banner(source))


if __name__ == "__main__":
    main()
