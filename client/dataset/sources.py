"""Where a dataset's images come from: a folder (recursive), a text file of paths, or a WebDataset-style .tar.

A source yields `Item`s one at a time in a fixed order (sorted names, member order), so a resumed run meets the
images in the same order as the first one; nothing holds more than the image being read. `count()` walks the
names once more, for the progress bar's total. The bytes are kept as read: they go to the server unchanged.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

# Files taken as images. The server decides what it supports (PNG, JPEG and WebP today): the others are sent
# anyway and its 415 recorded, so the index accounts for every image-looking file of the dataset.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Item:
    """One image of the source. `data` is None when it is not sent: `error` says why (recorded in the index)."""

    path: str  # as the index records it: relative to the folder, as written in the list, the tar member's name
    sha256: str  # of the bytes; "" when the file could not be read
    data: bytes | None
    error: str | None = None


class Source(Protocol):
    kind: str

    def __iter__(self) -> Iterator[Item]: ...

    def count(self) -> int: ...


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _read(f: IO[bytes], size: int, path: str, max_bytes: int) -> Item:
    """The item of an open file: its bytes and their sha256, or (over max_bytes) only the sha256, streamed."""
    if size > max_bytes:
        h = hashlib.sha256()
        while block := f.read(_CHUNK):
            h.update(block)
        why = f"413 body_too_large: the file is {size} bytes; the server takes at most {max_bytes}"
        return Item(path, h.hexdigest(), None, why)
    data = f.read()
    return Item(path, hashlib.sha256(data).hexdigest(), data)


def _read_file(file: Path, path: str, max_bytes: int) -> Item:
    try:
        with open(file, "rb") as f:
            return _read(f, os.fstat(f.fileno()).st_size, path, max_bytes)
    except OSError as e:  # missing, unreadable, a folder: recorded, never fatal
        return Item(path, "", None, f"unreadable: {e.strerror or e}")


class FolderSource:
    """Every image file under a folder, recursively; names sorted in each folder. Paths are relative, '/'-separated."""

    kind = "folder"

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def _files(self) -> Iterator[Path]:
        for folder, subfolders, files in os.walk(self.root):
            subfolders.sort()  # os.walk visits them in this list's order
            for name in sorted(files):
                if is_image_name(name):
                    yield Path(folder, name)

    def count(self) -> int:
        return sum(1 for _ in self._files())

    def __iter__(self) -> Iterator[Item]:
        for file in self._files():
            yield _read_file(file, file.relative_to(self.root).as_posix(), self.max_bytes)


class ListSource:
    """A text file with one image path a line (blank lines and '# comments' skipped); relative paths are taken
    from the list file's folder. Every line counts, whatever its extension: the list says what the images are."""

    kind = "list"

    def __init__(self, file: Path, max_bytes: int) -> None:
        self.file, self.max_bytes = file, max_bytes

    def _lines(self) -> Iterator[str]:
        with open(self.file, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line

    def count(self) -> int:
        return sum(1 for _ in self._lines())

    def __iter__(self) -> Iterator[Item]:
        base = self.file.parent
        for line in self._lines():
            yield _read_file(base / line, line, self.max_bytes)


class TarSource:
    """The image members of a tar (WebDataset shards: `key.jpg`, `key.cls`, ...; other members are skipped),
    read as a stream in member order; gzip/bz2/xz compressed tars too."""

    kind = "tar"

    def __init__(self, file: Path, max_bytes: int) -> None:
        self.file, self.max_bytes = file, max_bytes

    def _members(self, mode: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
        with tarfile.open(self.file, mode) as tf:  # type: ignore[call-overload]  # "r|*" or "r:*", by the caller
            while (m := tf.next()) is not None:
                if m.isfile() and is_image_name(m.name):
                    yield tf, m
                tf.members = []  # TarFile keeps every header it has read: 100k of them for a large shard

    def count(self) -> int:
        return sum(1 for _ in self._members("r:*"))  # seekable: headers only, the data is skipped

    def __iter__(self) -> Iterator[Item]:
        for tf, m in self._members("r|*"):  # a stream: no seeking, works for compressed tars too
            f = tf.extractfile(m)
            assert f is not None  # a regular file member
            yield _read(f, m.size, m.name, self.max_bytes)


def open_source(src: str | Path, max_bytes: int = 1 << 62) -> Source:
    """A folder, a .tar (.tar.gz, .tgz, ...) or else a text file of paths. max_bytes: larger images are not read
    (the server would refuse them), only hashed, and recorded as errors."""
    p = Path(src)
    if p.is_dir():
        return FolderSource(p, max_bytes)
    if not p.is_file():
        raise FileNotFoundError(f"no such folder or file: {src}")
    if tarfile.is_tarfile(p):
        return TarSource(p, max_bytes)
    return ListSource(p, max_bytes)
