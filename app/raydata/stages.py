"""The three stages of a Ray Data embedding job, each run where Ray places it:

    ShardSource (read tasks: one per source shard, fsspec)      rows: shard, index, last, uri, sha256, data | error
    -> decode_batch (CPU tasks: the serving core's decode and preprocessing)           data -> pixels (S, S, 3) uint8
    -> Embedder (an actor pool: weights loaded once per actor, on its GPU when it has one; the serving core's
       model call, OOM split and `unbatch`)                          pixels -> cls / mean / patches, status, node id

An image that cannot be read or decoded, or that the model fails on alone, becomes a row with status "error" and
the serving core's error text; it never fails the job. `last` marks a shard's last image, so the driver can write
a shard as soon as all of its rows have arrived.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from app.serving import imaging, model_thread
from app.serving.errors import ServingError
from app.serving.model_thread import Forward
from app.serving.pipeline import MaskSpec, prepare_image
from app.serving.registry import ModelEntry, Registry
from app.settings import Settings
from client.dataset.storage import Shard, filesystem, public_uri, read_shard
from model.masking import Masking

ROWS_PER_BLOCK = 32  # images per block out of a read task: a few MB of encoded images
POOL_KEYS = {"all": ("cls", "mean", "patches"), "cls": ("cls",), "mean": ("mean",), "patches": ("patches",)}
META = ("shard", "index", "last", "uri", "sha256", "error")


# ---------------------------------------------------------------------------------------------- reading
class ShardSource(Datasource):
    """Ray Data reads the source shards through this: one read task per shard, rows in the shard's order."""

    def __init__(self, shards: list[Shard], positions: list[int], max_bytes: int, image_column: str | None) -> None:
        super().__init__()
        self.shards, self.positions = shards, positions
        self.max_bytes, self.image_column = max_bytes, image_column

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        for pos, shard in zip(self.positions, self.shards, strict=True):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=(public_uri(shard.uri),), exec_stats=None)
            fn = partial(read_blocks, pos, shard, self.max_bytes, self.image_column)
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def read_blocks(pos: int, shard: Shard, max_bytes: int, image_column: str | None) -> Iterator[pa.Table]:
    """The shard's images in blocks of ROWS_PER_BLOCK; the last row of the last block has last=True."""
    rows: dict[str, list[Any]] = {k: [] for k in (*META, "data")}
    items = read_shard(shard, max_bytes, image_column)
    item = next(items, None)
    i = 0
    while item is not None:
        after = next(items, None)
        for key, value in zip((*META, "data"), (pos, i, after is None, item.path, item.sha256, item.error, item.data),
                              strict=True):  # fmt: skip
            rows[key].append(value)
        i, item = i + 1, after
        if len(rows["uri"]) == ROWS_PER_BLOCK or item is None:
            yield _block(rows)
            rows = {k: [] for k in rows}


def _block(rows: dict[str, list[Any]]) -> pa.Table:
    types = {"shard": pa.int32(), "index": pa.int64(), "last": pa.bool_(), "uri": pa.string(), "sha256": pa.string(),
             "error": pa.string(), "data": pa.binary()}  # fmt: skip
    return pa.table({k: pa.array(v, type=types[k]) for k, v in rows.items()})


# ---------------------------------------------------------------------------------------------- decoding
def error_text(e: BaseException) -> str:
    """`<code>: <message>`, the serving core's words for why an image is refused (HTTP adds only a status)."""
    code = getattr(e, "code", None) or type(e).__name__
    return f"{code}: {e}"


def decode_batch(batch: pa.Table, size: int, resize: imaging.ResizeMode, settings: Settings) -> dict[str, np.ndarray]:
    """Encoded images -> the model's uint8 input (size, size, 3), as the server prepares them (prepare_image)."""
    n = batch.num_rows
    out: dict[str, Any] = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in META}
    errors = list(batch.column("error").to_pylist())
    pixels = np.zeros((n, size, size, 3), np.uint8)
    for i, data in enumerate(batch.column("data").to_pylist()):
        if errors[i] is not None:
            continue
        try:
            pixels[i] = prepare_image(data, size, resize, settings)
        except ServingError as e:
            errors[i] = error_text(e)
    out["error"] = np.array(errors, dtype=object)
    out["pixels"] = pixels
    import ray  # in the task's process, where Ray is set up

    out["decode_node"] = np.array([ray.get_runtime_context().get_node_id()] * n, dtype=object)
    return out


# ---------------------------------------------------------------------------------------------- the model
def local_weights(spec: str) -> str:
    """MAE_WEIGHTS-style spec with remote paths (s3://, gs://, hf://, https://) copied to a local cache once."""
    parts = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, path = part.rpartition("=") if "=" in part.split("://")[0] else ("", "", part)
        if "://" in path and not path.startswith("file://"):
            fs, rpath = filesystem(path)
            local = os.path.join(tempfile.gettempdir(), "mae-weights", rpath.replace("/", "_"))
            if not os.path.exists(local):
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(rpath, local + ".part")
                os.replace(local + ".part", local)
            path = local
        parts.append(f"{name}{sep}{path}")
    return ",".join(parts)


def load_entry(weights: str, model: str | None, device: str) -> ModelEntry:
    """One model as the server loads it (app.serving.registry), on the model thread."""
    settings = Settings(weights=local_weights(weights), device=device, warmup=False)
    registry = model_thread.run(Registry.from_settings, settings)
    if model is not None and model not in registry:
        raise ValueError(f"no model {model!r}; the weights give {', '.join(registry.entries)}")
    return registry.get(model)


def keys_for(entry: ModelEntry, pool: str) -> tuple[str, ...]:
    keys = [k for k in POOL_KEYS[pool] if k != "cls" or entry.config.has_cls]
    return (*keys, "patch_indices") if "patches" in keys else tuple(keys)


class Embedder:
    """The model of one actor: loaded once, then a batch of decoded images at a time (map_batches)."""

    def __init__(self, weights: str, model: str | None, pool: str, dtype: str, mask_ratio: float, seed: int,
                 threads: int, forward: str | None = None) -> None:  # fmt: skip
        import ray

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.entry = load_entry(weights, model, "auto")
        self.keys = keys_for(self.entry, pool)
        self.dtype = np.dtype(dtype)
        self.mask = MaskSpec(mask_ratio, seed).masking(self.entry.config.num_patches, encoder_only=True)
        self.forward: Forward = model_thread.forward
        if forward:  # "module:function", a Forward (the tests slow the model down with one)
            module, _, fn = forward.partition(":")
            self.forward = getattr(importlib.import_module(module), fn)
        c = self.entry.config
        k = c.num_patches if self.mask is None else self.mask.len_keep
        d = c.embed_dim
        self.shapes = {"cls": (d,), "mean": (d,), "patches": (k, d), "patch_indices": (k,)}
        self.node = ray.get_runtime_context().get_node_id()

    def _compute(self, pixels: np.ndarray) -> list[Any]:
        n = pixels.shape[0]
        masking = None if self.mask is None else Masking(self.mask.noise.repeat(n, 1), self.mask.len_keep)
        return model_thread.run(
            model_thread.compute, self.forward, self.entry, "embed", torch.from_numpy(pixels), masking
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = [e if isinstance(e, str) else None for e in batch["error"]]  # a null may come as None or NaN
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        results: dict[int, Any] = {}
        rows = np.flatnonzero(ok)
        if len(rows):
            try:
                results = dict(zip(rows.tolist(), self._compute(batch["pixels"][rows]), strict=True))
            except Exception:  # one by one: the image that fails alone gets the error, the others their answer
                for i in rows.tolist():
                    try:
                        (results[i],) = self._compute(batch["pixels"][i : i + 1])
                    except Exception as e:
                        errors[i] = error_text(e)
        out: dict[str, Any] = {k: batch[k] for k in META if k != "error"}
        out["error"] = np.array(errors, dtype=object)
        out["status"] = np.array(["ok" if e is None else "error" for e in errors], dtype=object)
        out["node"] = np.array([self.node] * n, dtype=object)
        out["decode_node"] = batch["decode_node"]
        for key in self.keys:  # every batch has every column (error rows: zeros, written as nulls)
            col = np.zeros((n, *self.shapes[key]), np.int64 if key == "patch_indices" else self.dtype)
            for i, r in results.items():
                col[i] = getattr(r, key)
            out[key] = col
        return out
