"""Sources anywhere fsspec reaches: s3://, gs://, hf://, http(s)://, local paths; globs and brace ranges.

    SRC, with brace expressions expanded first, then each pattern matched in turn:
           shard-{000000..000099}.tar   brace range (zero padding kept)    {a,b}.tar   brace list
           s3://bucket/train/*.tar      glob                               photos/     a folder (recursive)
           list.txt                     one URI or path a line, relative to the list's folder

A source becomes *shards*, the unit of work and of resuming: a WebDataset tar (image members in member order), a
parquet file (one image a row, from its image-bytes column), or up to `shard_size` loose image files (sorted).
Each shard has a stable `name` that an output can be keyed by: a rerun over the same source finds the same names.

Credentials never appear here: fsspec and its back-ends read them from the environment and their own config
(AWS_ACCESS_KEY_ID / AWS_PROFILE / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, ~/.config/fsspec,
FSSPEC_<PROTOCOL>_<OPTION>). `public_uri` strips user info and query strings (signed URLs) from what is recorded.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit

from client.dataset.sources import Item, is_image_name

ShardKind = Literal["tar", "parquet", "files"]
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Columns taken as the image bytes of a parquet source, in this order; else its first binary column. A struct with
# a `bytes` field (Hugging Face datasets' Image feature) counts too.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB = re.compile(r"[*?\[]")


class SourceError(ValueError):
    """The source cannot be listed: nothing matches, an unknown protocol, a missing package (the message says)."""


@dataclass(frozen=True)
class Shard:
    kind: ShardKind
    uri: str  # the tar or parquet file; for loose files the first one
    files: tuple[str, ...] = field(default=())  # kind "files": the images, in order

    @property
    def name(self) -> str:
        """Stable and file-name safe: the file's stem and a hash of what the shard holds."""
        what = "\n".join(self.files) if self.kind == "files" else self.uri
        digest = hashlib.sha1(what.encode()).hexdigest()[:10]
        stem = posixpath.basename(urlsplit(self.uri).path) or "shard"
        for suffix in (*TAR_SUFFIXES, *PARQUET_SUFFIXES):
            stem = stem.removesuffix(suffix)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60]
        return f"{stem}-{len(self.files)}-{digest}" if self.kind == "files" else f"{stem}-{digest}"


def braces(pattern: str) -> list[str]:
    """Brace expansion as a shell does it: {0..3} and {000..099} (zero padding kept), {a,b,c}, nested ones too."""
    open_at = pattern.find("{")
    while open_at != -1:
        depth, parts, start = 0, [], open_at + 1
        for i in range(open_at, len(pattern)):
            ch = pattern[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    parts.append(pattern[start:i])
                    head, tail = pattern[:open_at], pattern[i + 1 :]
                    if len(parts) > 1:
                        return [x for p in parts for x in braces(head + p + tail)]
                    r = _RANGE.fullmatch(parts[0])
                    if r:
                        lo, hi = int(r.group(1)), int(r.group(2))
                        first = r.group(1).lstrip("-")
                        width = len(first) if first.startswith("0") and len(first) > 1 else 0
                        step = 1 if hi >= lo else -1
                        return [x for n in range(lo, hi + step, step) for x in braces(f"{head}{n:0{width}d}{tail}")]
                    break  # {word}: no expression, kept literally; look further on
            elif ch == "," and depth == 1:
                parts.append(pattern[start:i])
                start = i + 1
        else:
            break  # unbalanced: literal
        open_at = pattern.find("{", open_at + 1)
    return [pattern]


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URI or local path."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - the extra is missing
        raise SourceError("reading this source needs fsspec: pip install 'mae-serve[storage]'") from None
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise SourceError(f"cannot open {public_uri(uri)}: {e}") from None


def public_uri(uri: str) -> str:
    """The URI without user info or query string: what a manifest may record."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "image" if is_image_name(low) else "other"


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def expand(src: str, shard_size: int = 10_000) -> list[Shard]:
    """The shards of a source, in a fixed order (patterns in the order given, each one's matches sorted)."""
    shards: list[Shard] = []
    loose: list[str] = []

    def flush() -> None:
        for i in range(0, len(loose), shard_size):
            part = tuple(loose[i : i + shard_size])
            shards.append(Shard("files", part[0], part))
        loose.clear()

    for pattern in braces(src):
        fs, path = filesystem(pattern)
        if _GLOB.search(path):
            found = sorted(fs.glob(path))
            if not found:
                raise SourceError(f"nothing matches {public_uri(pattern)}")
            entries = [(p, fs.isdir(p)) for p in found]
        else:
            if not fs.exists(path):
                raise SourceError(f"no such file or folder: {public_uri(pattern)}")
            entries = [(path, fs.isdir(path))]
        for p, is_dir in entries:
            files = sorted(fs.find(p)) if is_dir else [p]
            for f in files:
                uri = fs.unstrip_protocol(f) if _is_remote(pattern) else f
                kind = _kind(f)
                if kind == "image":
                    loose.append(uri)
                    continue
                flush()
                if kind in ("tar", "parquet"):
                    shards.append(Shard(kind, uri))  # type: ignore[arg-type]
                elif not is_dir:  # a file named on its own that is neither: a list of images
                    loose.extend(_list_file(fs, f, uri))
                    flush()
        flush()
    return shards


def _list_file(fs: Any, path: str, uri: str) -> list[str]:
    """A text file of image URIs or paths, one a line ('#' comments); relative ones from the list's folder."""
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out = []
    with fs.open(path, "rt", encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            out.append(line if "://" in line or line.startswith("/") else f"{base}/{line}")
    return out


# ---------------------------------------------------------------------------------------------- reading a shard
def _item(uri: str, data: bytes, max_bytes: int) -> Item:
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > max_bytes:
        why = f"413 body_too_large: the file is {len(data)} bytes; the limit is {max_bytes}"
        return Item(uri, digest, None, why)
    return Item(uri, digest, data)


def read_shard(shard: Shard, max_bytes: int = 1 << 62, image_column: str | None = None) -> Iterator[Item]:
    """The shard's images as Items, in order. An image that cannot be read is an Item with its error; a shard that
    breaks off (a truncated tar, an unreadable parquet) ends with one error Item naming the shard."""
    if shard.kind == "files":
        for uri in shard.files:
            try:
                fs, path = filesystem(uri)
                data = fs.cat_file(path)
            except (OSError, SourceError) as e:
                yield Item(uri, "", None, f"unreadable: {e}")
                continue
            yield _item(uri, data, max_bytes)
        return
    reader = _read_tar if shard.kind == "tar" else _read_parquet
    try:
        fs, path = filesystem(shard.uri)
        with fs.open(path, "rb") as f:
            yield from reader(f, shard.uri, max_bytes, image_column)
    except (OSError, EOFError, tarfile.TarError, ValueError, SourceError) as e:
        yield Item(f"{shard.uri}#", "", None, f"unreadable {shard.kind}: {type(e).__name__}: {e}")


def _read_tar(f: IO[bytes], uri: str, max_bytes: int, _: str | None) -> Iterator[Item]:
    with tarfile.open(fileobj=f, mode="r|*") as tf:  # a stream: no seeking, compressed tars too
        while (m := tf.next()) is not None:
            if m.isfile() and is_image_name(m.name):
                member = tf.extractfile(m)
                assert member is not None
                yield _item(f"{uri}#{m.name}", member.read(), max_bytes)
            cast(Any, tf).members = []  # TarFile keeps every header it has read


def image_column_of(schema: Any, wanted: str | None = None) -> str:
    """The column holding the image bytes: `wanted`, else the first of IMAGE_COLUMNS, else the first binary one."""
    import pyarrow as pa

    def holds_bytes(t: Any) -> bool:
        if pa.types.is_struct(t):
            return any(t.field(i).name == "bytes" for i in range(t.num_fields))
        return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t))

    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"the parquet has no column {wanted!r}; it has {names}")
        return wanted
    for name in (*IMAGE_COLUMNS, *names):
        if name in names and holds_bytes(schema.field(name).type):
            return name
    raise SourceError(f"no image-bytes column in the parquet: {names}")


def _read_parquet(f: IO[bytes], uri: str, max_bytes: int, image_column: str | None) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    column = image_column_of(pf.schema_arrow, image_column)
    row = 0
    for batch in pf.iter_batches(batch_size=64, columns=[column]):
        values = batch.column(0)
        if pa.types.is_struct(values.type):
            values = values.field("bytes")
        for v in values.to_pylist():
            if v is None:
                yield Item(f"{uri}#{row}", "", None, "unreadable: the row has no image bytes (null)")
            else:
                yield _item(f"{uri}#{row}", bytes(v), max_bytes)
            row += 1


class ShardsSource:
    """The shards of an fsspec source as one embed-dataset Source: every image in shard order."""

    kind = "fsspec"

    def __init__(self, shards: list[Shard], max_bytes: int) -> None:
        self.shards, self.max_bytes = shards, max_bytes

    def __iter__(self) -> Iterator[Item]:
        for shard in self.shards:
            yield from read_shard(shard, self.max_bytes)

    def count(self) -> int:
        return sum(len(s.files) if s.kind == "files" else _count(s) for s in self.shards)


def _count(shard: Shard) -> int:
    """Images in a tar or parquet shard (a parquet's footer; a tar's headers, read through)."""
    fs, path = filesystem(shard.uri)
    with fs.open(path, "rb") as f:
        if shard.kind == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(f).metadata.num_rows)
        with tarfile.open(fileobj=f, mode="r|*") as tf:
            n = 0
            while (m := tf.next()) is not None:
                n += m.isfile() and is_image_name(m.name)
                cast(Any, tf).members = []
            return n


def needs_fsspec(src: str) -> bool:
    """Whether a source is more than one local folder, list or tar (embed-dataset's own sources)."""
    return "://" in src or bool(_GLOB.search(src)) or bool(_BRACE.search(src)) or src.lower().endswith(PARQUET_SUFFIXES)
