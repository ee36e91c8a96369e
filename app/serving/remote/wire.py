"""What the model process and the workers say to each other (app.serving.remote): ZeroMQ multipart messages of a
kind, a JSON header and raw array frames (never pickles).

    worker -> model    hello                                   -> catalog {models: [...], default}
                       work  {id, model, op, shape, len_keep, deadline}  image (uint8 H*W*3)  noise (float32 L | empty)
                       cancel {id, reason}
    model -> worker    ok    {id, ...}  arrays                 (one result: an Embedding or a Reconstruction)
                       error {id, kind, message}               (overloaded | deadline | failed)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import zmq

from app.serving.errors import ComputeFailed, DeadlineExceeded, Overloaded
from app.serving.model_thread import Op, Result
from model.masking import Masking
from model.outputs import Embedding, Reconstruction

ERRORS: dict[str, type[Exception]] = {"overloaded": Overloaded, "deadline": DeadlineExceeded, "failed": ComputeFailed}


def kind_of(e: BaseException) -> str:
    """An engine's refusal -> its kind on the wire (ERRORS maps it back)."""
    return "overloaded" if isinstance(e, Overloaded) else "deadline" if isinstance(e, DeadlineExceeded) else "failed"


def pack(result: Result) -> tuple[dict[str, Any], list[bytes | np.ndarray]]:
    """A result -> (header, array frames)."""
    if isinstance(result, Embedding):
        head = {"type": "embedding", "grid": result.grid, "k": int(result.patches.shape[0]),
                "d": int(result.patches.shape[1]), "cls": result.cls is not None}  # fmt: skip
        cls = result.cls if result.cls is not None else b""
        return head, [cls, result.mean, result.patches, result.patch_indices]
    head = {"type": "reconstruction", "grid": result.grid, "patch_size": result.patch_size, "mse": result.mse,
            "l": int(result.pixels.shape[0]), "pd": int(result.pixels.shape[1])}  # fmt: skip
    return head, [result.pixels, result.mask, result.patch_error]


def unpack(head: dict[str, Any], frames: list[zmq.Frame]) -> Result:
    """(header, frames) -> the result, its arrays views of the received frames (no copy)."""

    def arr(frame: zmq.Frame, dtype: type[np.generic], *shape: int) -> np.ndarray:
        return np.frombuffer(frame.buffer, dtype=dtype).reshape(shape)

    grid = tuple(head["grid"])
    if head["type"] == "embedding":
        k, d = head["k"], head["d"]
        cls = arr(frames[0], np.float32, d) if head["cls"] else None
        return Embedding(cls, arr(frames[1], np.float32, d), arr(frames[2], np.float32, k, d),
                         arr(frames[3], np.int64, k), grid)  # fmt: skip
    length, pd = head["l"], head["pd"]
    return Reconstruction(arr(frames[0], np.uint8, length, pd), arr(frames[1], np.bool_, length),
                          arr(frames[2], np.float32, length), float(head["mse"]), grid,
                          int(head["patch_size"]))  # fmt: skip


def work(i: int, model: str, op: Op, image: np.ndarray, masking: Masking | None, deadline: float | None) -> list[Any]:
    """One image to compute -> the worker's `work` message (its frames, after the socket's identity)."""
    noise = b"" if masking is None else masking.noise.numpy().astype(np.float32).tobytes()
    head = {"id": i, "model": model, "op": op, "shape": list(image.shape),
            "len_keep": None if masking is None else masking.len_keep, "deadline": deadline}  # fmt: skip
    return [b"work", json.dumps(head).encode(), np.ascontiguousarray(image), noise]


def read_work(head: dict[str, Any], frames: list[zmq.Frame]) -> tuple[np.ndarray, Masking | None]:
    """A `work` message's header and frames -> the image (a view of its frame) and the masking (None: no mask)."""
    image = np.frombuffer(frames[0].buffer, dtype=np.uint8).reshape(head["shape"])
    masking = None
    if head["len_keep"] is not None:
        noise = torch.from_numpy(np.frombuffer(frames[1].buffer, dtype=np.float32).copy())[None]
        masking = Masking(noise, int(head["len_keep"]))
    return image, masking
