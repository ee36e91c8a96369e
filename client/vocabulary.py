"""The words both sides of the API use: image formats and their media types, and the values of the options.

The server validates against these very lists (app.http.params, app.serving.imaging) and the client offers them
(mae-client, embed-dataset), so the two cannot drift apart. A leaf: it imports nothing of the project.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

ResizeMode = Literal["squash", "crop", "pad"]
Pooling = Literal["all", "cls", "mean", "patches"]
EmbedDtype = Literal["float32", "float16"]

RESIZES: tuple[str, ...] = get_args(ResizeMode)
POOLS: tuple[str, ...] = ("cls", "mean", "patches", "all")  # the order mae-client lists them in
DTYPES: tuple[str, ...] = ("float16", "float32")


def check_options(pool: str, dtype: str, resize: str, mask_ratio: float, counts: dict[str, int | None]) -> None:
    """A dataset job's options (embed-dataset, mae-embed-ray), in their command-line names: ValueError naming the
    first bad one. `counts`: option name -> a value that must be at least 1 when given."""
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {', '.join(POOLS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if resize not in RESIZES:
        raise ValueError(f"--resize must be one of {', '.join(RESIZES)}")
    if not (math.isfinite(mask_ratio) and 0 <= mask_ratio < 1):
        raise ValueError("--mask-ratio must be in [0, 1)")
    for name, v in counts.items():
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
}
# The media type a client sends for a file, by its suffix (the CLI client, embed-dataset).
_MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "jfif": "image/jpeg",
    "webp": "image/webp",
}


def media_type(filename: str) -> str:
    return _MEDIA_TYPES.get(filename.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the first bytes; None for anything else."""
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
