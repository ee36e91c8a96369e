"""The parquet form of an embeddings output (`mae-embed-ray`): one file per source shard, one row per image.

    DIR/manifest.json          model, weights sha256, parameters, array shapes, the source's shards in order and,
                               per finished shard, its file, counts and the Ray node ids that embedded it
    DIR/<shard name>.parquet   one row per image of that source shard, in the shard's order

Columns (pyarrow types; an error row has null arrays):

    uri            string        where the image came from: a file's URI, `<tar URI>#<member>`, `<parquet URI>#<row>`
    sha256         string        of the image's bytes (hex)
    status         string        ok | error
    error          string        null when ok, else `<code>: <message>` (e.g. `unsupported_type: ...`)
    cls, mean      fixed_size_list<float16|float32>[D]                      by --pool (all: both)
    patches        fixed_size_list<fixed_size_list<float16|float32>[D]>[K]  with --pool patches|all
    patch_indices  fixed_size_list<int64>[K]                                raster indices of `patches`' rows

A shard's file appears whole or not at all (written beside, then renamed; one PUT on an object store), so a
rerun finds the finished shards by listing DIR. Any parquet reader takes the files: pandas, polars, DuckDB,
`datasets.load_dataset("parquet", ...)`, Spark; `load_embeddings(DIR)` gives numpy arrays like the .npy form.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np

FORMAT = "mae-serve/embed-parquet/1"
MANIFEST = "manifest.json"
META_KEY = b"mae-serve"
INDEX_COLUMNS = ("uri", "sha256", "status", "error")


def _pa() -> Any:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - the extra is missing
        raise ImportError("parquet output needs pyarrow: pip install 'mae-serve[storage]'") from None
    return pa


def _fs(uri: str) -> tuple[Any, str]:
    from client.dataset.storage import filesystem

    return filesystem(uri)


def _join(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


def array_column(a: np.ndarray, ok: np.ndarray) -> Any:
    """(N, ...) rows -> a (nested) fixed-size list column, null where not `ok`."""
    pa = _pa()
    col = pa.array(np.ascontiguousarray(a).reshape(-1))
    for size in reversed(a.shape[2:]):
        col = pa.FixedSizeListArray.from_arrays(col, size)
    return pa.FixedSizeListArray.from_arrays(col, a.shape[1], mask=pa.array(~ok))


def to_table(index: dict[str, list[Any]], arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> Any:
    """index: uri, sha256, status, error (lists, one entry per row); arrays: key -> (N, ...) rows (anything in error
    rows); metadata: JSON kept in the file's schema."""
    pa = _pa()
    ok = np.array([s == "ok" for s in index["status"]], dtype=bool)
    columns = {c: pa.array(index[c], type=pa.string()) for c in INDEX_COLUMNS}
    for key, a in arrays.items():
        columns[key] = array_column(a, ok)
    table = pa.table(columns)
    return table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})


def write_table(table: Any, out: str, name: str, compression: str | None = None) -> str:
    """Write `table` as DIR/<name>.parquet, whole or not at all; returns the file name."""
    import pyarrow.parquet as pq

    fs, path = _fs(out)
    fname = f"{name}.parquet"
    final = _join(path, fname)
    local = type(fs).__name__ == "LocalFileSystem"
    target = _join(path, f".{fname}.{uuid.uuid4().hex}.tmp") if local else final
    with fs.open(target, "wb") as f:
        pq.write_table(table, f, compression=compression or "none")
    if local:
        os.replace(target, final)
    return fname


def finished(out: str) -> set[str]:
    """The shard names whose file is in DIR."""
    fs, path = _fs(out)
    if not fs.exists(path):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {n.removesuffix(".parquet") for n in names if n.endswith(".parquet") and not n.startswith(".")}


def read_manifest(out: str) -> dict[str, Any] | None:
    fs, path = _fs(out)
    p = _join(path, MANIFEST)
    if not fs.exists(p):
        return None
    with fs.open(p, "rt") as f:
        return dict(json.load(f))


def write_manifest(out: str, manifest: dict[str, Any]) -> None:
    fs, path = _fs(out)
    fs.makedirs(path, exist_ok=True)
    text = json.dumps(manifest, indent=1) + "\n"
    p = _join(path, MANIFEST)
    if type(fs).__name__ == "LocalFileSystem":
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)  # readers see the old or the new one
    else:
        with fs.open(p, "wt") as f:
            f.write(text)


def _values(column: Any, row_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A fixed-size list column without nulls -> (N, *row_shape) numpy (no copy where Arrow allows)."""
    flat = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    for _ in row_shape:
        flat = flat.values
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, *row_shape)


def load(out: str, key: str | None = None, manifest: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(embeddings, index) of a parquet output, like store.load_embeddings: the ok rows' `key` array (default: the
    run's pool; cls for pool=all) in source order, and their index columns: path (the uri), sha256, status, error,
    shard (position of the source shard), row (in its file)."""
    import pyarrow.parquet as pq

    manifest = manifest or read_manifest(out)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ValueError(f"{out} is not a parquet embeddings output")
    arrays = manifest.get("arrays", {})
    if key is None:
        pool = manifest["parameters"]["pool"]
        key = pool if pool != "all" else ("cls" if "cls" in arrays else "mean")
    fs, path = _fs(out)
    done = finished(out)
    parts: list[np.ndarray] = []
    index: dict[str, Any] = {"path": [], "sha256": [], "status": [], "error": [], "shard": [], "row": []}
    for s, name in enumerate(manifest.get("order", [])):
        if name not in done:
            continue
        with fs.open(_join(path, f"{name}.parquet"), "rb") as f:
            t = pq.read_table(f, memory_map=True)
        ok = np.array([v == "ok" for v in t.column("status").to_pylist()], dtype=bool)
        rows = np.flatnonzero(ok)
        t_ok = t.take(rows)
        for c in ("sha256", "status", "error"):
            index[c].extend(t_ok.column(c).to_pylist())
        index["path"].extend(t_ok.column("uri").to_pylist())
        index["shard"].extend([s] * len(rows))
        index["row"].extend(rows.tolist())
        if len(rows) and key not in t.column_names:
            raise KeyError(f"{out} has no {key!r} array; it has {sorted(arrays)}")
        if len(rows):
            spec = arrays[key]
            parts.append(_values(t_ok.column(key), tuple(spec["row_shape"]), spec["dtype"]))
    for c in ("shard", "row"):
        index[c] = np.asarray(index[c], dtype=np.int64)
    if not parts:
        spec = arrays.get(key, {"dtype": "float32", "row_shape": [0]})
        return np.empty((0, *spec["row_shape"]), spec["dtype"]), index
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), index


def load_index(out: str) -> dict[str, Any]:
    """Every row of a parquet output, errors included, as columns (path = uri, sha256, status, error, shard, row)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(out) or {}
    fs, path = _fs(out)
    done = finished(out)
    index: dict[str, Any] = {"path": [], "sha256": [], "status": [], "error": [], "shard": [], "row": []}
    for s, name in enumerate(manifest.get("order", [])):
        if name not in done:
            continue
        with fs.open(_join(path, f"{name}.parquet"), "rb") as f:
            t = pq.read_table(f, columns=list(INDEX_COLUMNS))
        index["path"].extend(t.column("uri").to_pylist())
        for c in ("sha256", "status", "error"):
            index[c].extend(t.column(c).to_pylist())
        index["shard"].extend([s] * t.num_rows)
        index["row"].extend(range(t.num_rows))
    for c in ("shard", "row"):
        index[c] = np.asarray(index[c], dtype=np.int64)
    return index
