"""Read the files inside a Qt resource bundle (.rcc), the format GCompris ships its activities' images in.

A .rcc is a header, a tree of nodes, a names table and a data table (see Qt's rcc.cpp, `RCCResourceLibrary`):

    header  "qres", version, tree offset, data offset, names offset (big-endian u32), [v3: flags]
    node    name offset (u32), flags (u16), then for a directory: child count, first child index (u32, u32);
            for a file: country, language (u16, u16), data offset (u32); version >= 2 adds a u64 timestamp
    name    length (u16), hash (u32), UTF-16BE characters
    data    size (u32), bytes; zlib-compressed files (flag 1) start with their uncompressed size (u32)

Only reading is needed, so this is a small pure-Python reader rather than a Qt dependency.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_COMPRESSED_ZLIB = 0x01
_DIRECTORY = 0x02
_COMPRESSED_ZSTD = 0x04


class RccError(ValueError):
    """Not a readable Qt resource bundle."""


def read_rcc(data: bytes | str | Path) -> dict[str, bytes]:
    """Every file in the bundle, keyed by its path inside it (no leading slash), uncompressed."""
    b = Path(data).read_bytes() if isinstance(data, str | Path) else data
    if b[:4] != b"qres":
        raise RccError("not a Qt resource file (no 'qres' magic)")
    version, tree, data_off, names = struct.unpack(">IIII", b[4:20])
    if version not in (1, 2, 3):
        raise RccError(f"unsupported rcc version {version}")
    node_size = 14 if version == 1 else 22

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off : names + off + 2])
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}
    stack = [(0, "")]  # node index, path of its parent folder
    while stack:
        index, prefix = stack.pop()
        p = tree + index * node_size
        name_off, flags = struct.unpack(">IH", b[p : p + 6])
        name = name_at(name_off) if index else ""  # the root node has no name
        path = f"{prefix}/{name}" if prefix else name
        if flags & _DIRECTORY:
            count, first = struct.unpack(">II", b[p + 6 : p + 14])
            stack.extend((child, path) for child in range(first, first + count))
            continue
        (off,) = struct.unpack(">I", b[p + 10 : p + 14])
        (size,) = struct.unpack(">I", b[data_off + off : data_off + off + 4])
        raw = b[data_off + off + 4 : data_off + off + 4 + size]
        if flags & _COMPRESSED_ZSTD:
            raise RccError(f"{path}: zstd-compressed entries are not supported")
        if flags & _COMPRESSED_ZLIB:
            raw = zlib.decompress(raw[4:])  # qCompress format: u32 length, then a zlib stream
        out[path] = raw
    return out
