"""The output folder of `mae-client embed-dataset`: .npy shards, an index (CSV), a manifest.json; and its loaders.

    DIR/manifest.json         model, weights sha256, parameters, array shapes, counts, timing of every run
    DIR/index.csv             one row per image: path, sha256, shard, row, status (ok | error), error
    DIR/<key>-00000.npy ...   per array (cls, mean, patches, patch_indices): rows in index order, `shard_size` a file

Crash-safe by ordering alone: an answer's rows are appended to the shard files and flushed, the .npy headers
updated, and only then its index lines written and flushed. So every index line points at rows on disk, whenever
the process dies. What lies past the last complete index line (rows of a killed run, a torn last line) is cut
off when the folder is opened again. The ok rows of the index and the rows of the shards are in the same order,
the source's; a resumed run appends where the last one stopped and ends with the index an uninterrupted one
writes. One run at a time writes a folder (an flock on DIR/.lock).

Why CSV and not Parquet: the index must be appended to line by line while the run goes, and a Parquet file is
only readable once its footer is written (a killed writer leaves nothing readable). A Parquet index would need
this CSV journal anyway, plus pyarrow (~170 MB installed) for a few MB of paths and hashes. bench/index_format.py
has the numbers.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset.table import FORMAT as PARQUET_FORMAT
from client.dataset.table import load as load_parquet
from client.dataset.table import load_index as load_parquet_index

INDEX = "index.csv"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held (flock) by the run writing the folder
COLUMNS = ("path", "sha256", "shard", "row", "status", "error")
FORMAT = "mae-serve/embed-dataset/1"
_SHARD_NAME = re.compile(r"(?P<key>[a-z_]+)-(?P<shard>\d{5,})\.npy")


class StoreError(RuntimeError):
    """The output folder cannot be used (another run's parameters, damaged files): the message says what to do."""


@dataclass(frozen=True)
class ArraySpec:
    dtype: str  # numpy name: float16, float32, int64
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))


def shard_file(out: Path, key: str, shard: int) -> Path:
    return out / f"{key}-{shard:05d}.npy"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # readers see the old or the new manifest, never half of one


# ---------------------------------------------------------------------------------------------- one .npy shard
class NpyAppender:
    """A .npy file that grows by rows: data appended at the end, the header's row count rewritten in place.

    numpy leaves room in the header for the first axis to grow (its GROWTH_AXIS_MAX_DIGITS padding), so the header
    keeps its length and the file is a valid, memory-mappable .npy after every `sync()`.
    """

    def __init__(self, path: Path, spec: ArraySpec, rows: int) -> None:
        """Open at `rows` rows: a new file (rows == 0 and none there) or an existing one cut back to `rows`."""
        self.path, self.spec, self.rows = path, spec, rows
        if path.exists():
            self.f = open(path, "r+b")  # noqa: SIM115 - kept open for the run
            try:
                if np.lib.format.read_magic(self.f) == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(self.f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(self.f)
            except ValueError as e:
                raise StoreError(f"{path} is not a readable .npy ({e}): the output is damaged") from None
            self.offset = self.f.tell()
            if dtype != np.dtype(spec.dtype) or tuple(shape[1:]) != spec.row_shape:
                raise StoreError(f"{path.name} holds {dtype} rows of {shape[1:]}, not {spec.dtype} {spec.row_shape}")
            need = self.offset + rows * spec.row_bytes
            if os.fstat(self.f.fileno()).st_size < need:
                raise StoreError(f"{path} is shorter than the index says ({rows} rows): the output is damaged")
            self.f.truncate(need)
        else:
            if rows:
                raise StoreError(f"{path} is missing but the index has {rows} rows in it: the output is damaged")
            self.f = open(path, "w+b")  # noqa: SIM115
        self._write_header()
        self.offset = self.f.tell()
        self.f.seek(0, os.SEEK_END)

    def _write_header(self) -> None:
        self.f.seek(0)
        header = {
            "descr": np.dtype(self.spec.dtype).str,
            "fortran_order": False,
            "shape": (self.rows, *self.spec.row_shape),
        }
        np.lib.format.write_array_header_1_0(self.f, header)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.spec.dtype)
        assert rows.shape[1:] == self.spec.row_shape, (rows.shape, self.spec)
        self.f.write(rows.tobytes())
        self.rows += rows.shape[0]

    def sync(self) -> None:
        """Data first, then the header that counts it."""
        self.f.flush()
        self._write_header()
        if self.f.tell() != self.offset:  # cannot happen with numpy's growth padding; never corrupt silently
            raise StoreError(f"{self.path}: the .npy header changed length")
        self.f.seek(0, os.SEEK_END)
        self.f.flush()

    def close(self, fsync: bool = False) -> None:
        self.sync()
        if fsync:
            os.fsync(self.f.fileno())
        self.f.close()


# ---------------------------------------------------------------------------------------------- the index
def _complete_end(raw: bytes) -> int:
    """Where the last whole record ends: after the last newline outside quotes (a path may hold a newline)."""
    end = raw.rfind(b"\n") + 1
    quotes = raw.count(b'"', 0, end)
    while quotes % 2:  # that newline is inside a quoted field: try the one before
        prev = raw.rfind(b"\n", 0, end - 1) + 1
        quotes -= raw.count(b'"', prev, end)
        end = prev
    return end


def read_index(out: Path, repair: bool = False) -> dict[str, Any]:
    """The index as columns: path, sha256, status, error (lists of str), shard, row (int64 arrays, -1 for an error
    row). `pandas.DataFrame(read_index(d))` takes it as is. A torn last record (a killed writer) is dropped, and
    with repair=True cut from the file."""
    path = out / INDEX
    raw = path.read_bytes() if path.exists() else b""
    end = _complete_end(raw)
    reader = csv.reader(io.StringIO(raw[:end].decode("utf-8"), newline=""))
    header = next(reader, None)
    if header is not None and tuple(header) != COLUMNS:
        raise StoreError(f"{path} is not an embed-dataset index (columns {header})")
    index: dict[str, Any] = {c: [] for c in COLUMNS}
    # Column by column as the records stream by: no list per record is kept (1M of them made the GC crawl).
    a_path, a_sha, a_shard, a_row, a_status, a_error = (index[c].append for c in COLUMNS)
    for rec in reader:
        try:
            path_, sha, shard, row, status, error = rec
        except ValueError:  # whole lines are written at once: this is damage, not a torn end
            raise StoreError(f"{path} is damaged: line {reader.line_num} has {len(rec)} fields") from None
        a_path(path_), a_sha(sha), a_shard(shard), a_row(row), a_status(status), a_error(error)
    for key in ("shard", "row"):
        index[key] = np.array([int(v) if v else -1 for v in index[key]], dtype=np.int64)
    ok = np.array([v == "ok" for v in index["status"]], dtype=bool)
    if not set(index["status"]) <= {"ok", "error"} or not np.array_equal(ok, index["shard"] >= 0):
        raise StoreError(f"{path} is damaged: a status other than ok/error, or an ok row without its shard")
    if repair and end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return index


def select(index: dict[str, Any], which: np.ndarray) -> dict[str, Any]:
    """The index rows at `which` (indices or a boolean mask), as columns again."""
    idx = np.flatnonzero(which) if np.asarray(which).dtype == bool else np.asarray(which, dtype=np.int64)
    return {k: v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx] for k, v in index.items()}


# ---------------------------------------------------------------------------------------------- the writer
class Store:
    """An output folder opened for writing: `add` results in source order, `commit` makes them durable."""

    def __init__(self, out: Path, manifest: dict[str, Any], index: dict[str, Any], lock: Any = None) -> None:
        self.out, self.manifest, self._lock = out, manifest, lock
        self.shard_size: int = manifest["parameters"]["shard_size"]
        self.specs = {k: ArraySpec(v["dtype"], tuple(v["row_shape"])) for k, v in manifest.get("arrays", {}).items()}
        self.n_ok = int((index["shard"] >= 0).sum())
        self.n_error = len(index["path"]) - self.n_ok
        # path -> sha256 of what the index holds (the last row per path): these are skipped when met again
        self.done: dict[str, str] = dict(zip(index["path"], index["sha256"], strict=True))
        self._writers: dict[str, NpyAppender] = {}
        self._lines = io.StringIO()
        self._csv = csv.writer(self._lines, lineterminator="\n")
        self._index = open(out / INDEX, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if self._index.tell() == 0:
            self._csv.writerow(COLUMNS)
        self._cut_shards()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, out: Path, identity: dict[str, Any], extra: dict[str, Any]) -> Store:
        """Create `out`, or resume the run in it. `identity` (model, weights sha256, parameters) must equal the
        existing run's: a resumed run may not mix embeddings of two settings. `extra` is written as given."""
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreError(f"another run is writing to {out}: wait for it, or choose another --out") from None
        try:
            return cls._open_locked(out, identity, extra, lock)
        except BaseException:
            lock.close()
            raise

    @classmethod
    def _open_locked(cls, out: Path, identity: dict[str, Any], extra: dict[str, Any], lock: Any) -> Store:
        path = out / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise StoreError(f"{path} is not an embed-dataset manifest")
            for key, want in identity.items():
                if manifest.get(key) != want:
                    raise StoreError(
                        f"{out} holds a run with {key} {json.dumps(manifest.get(key))}, not {json.dumps(want)}: "
                        "resume with the same settings, or choose another --out"
                    )
        elif any(f.name != LOCK for f in out.iterdir()):
            raise StoreError(f"{out} is not empty and has no {MANIFEST}: choose an empty or new folder")
        else:
            manifest = {"format": FORMAT, **identity, "arrays": {}, "runs": []}
        manifest.update(extra)
        store = cls(out, manifest, read_index(out, repair=True), lock)
        store.write_manifest()
        return store

    def _cut_shards(self) -> None:
        """Make the shard files agree with the index: cut rows past it, remove shards it does not reach."""
        for f in self.out.glob("*.npy"):
            m = _SHARD_NAME.fullmatch(f.name)
            if m is None or m["key"] not in self.specs:
                continue
            rows = min(max(self.n_ok - int(m["shard"]) * self.shard_size, 0), self.shard_size)
            if rows == 0:
                f.unlink()
            else:
                NpyAppender(f, self.specs[m["key"]], rows).close()
        if self.n_ok:  # every shard the index reaches must be there
            last = (self.n_ok - 1) // self.shard_size
            for key in self.specs:
                for s in range(last + 1):
                    if not shard_file(self.out, key, s).exists():
                        raise StoreError(f"{shard_file(self.out, key, s)} is missing: the output is damaged")

    # ------------------------------------------------------------------ writing
    def _writer(self, key: str) -> NpyAppender:
        shard, row = divmod(self.n_ok, self.shard_size)
        w = self._writers.get(key)
        if w is not None and w.path == shard_file(self.out, key, shard):
            return w
        if w is not None:
            w.close()  # a full shard
        w = self._writers[key] = NpyAppender(shard_file(self.out, key, shard), self.specs[key], row)
        return w

    def add_ok(self, path: str, sha256: str, arrays: dict[str, np.ndarray]) -> None:
        """One image's arrays (each one row, without the leading axis)."""
        if not self.specs:  # the first answer fixes what every row holds
            self.specs = {k: ArraySpec(str(a.dtype), tuple(a.shape)) for k, a in arrays.items()}
            self.manifest["arrays"] = {
                k: {"dtype": s.dtype, "row_shape": list(s.row_shape)} for k, s in self.specs.items()
            }
            self.write_manifest()  # before any row: whoever finds rows also finds their shapes
        got = {k: (str(a.dtype), tuple(a.shape)) for k, a in arrays.items()}
        want = {k: (s.dtype, s.row_shape) for k, s in self.specs.items()}
        if got != want:
            raise StoreError(f"the server answered {got} for {path}, unlike the earlier rows {want}")
        shard, row = divmod(self.n_ok, self.shard_size)
        for key, a in arrays.items():
            self._writer(key).append(a[None])
        self._csv.writerow((path, sha256, shard, row, "ok", ""))
        self.n_ok += 1
        self.done[path] = sha256

    def add_error(self, path: str, sha256: str, error: str) -> None:
        self._csv.writerow((path, sha256, "", "", "error", error))
        self.n_error += 1
        self.done[path] = sha256

    def commit(self) -> None:
        """Shard rows and headers to the files first, then the index lines that point at them."""
        for w in self._writers.values():
            w.sync()
        self._index.write(self._lines.getvalue())
        self._index.flush()
        self._lines.seek(0)
        self._lines.truncate()

    def write_manifest(self) -> None:
        self.manifest["counts"] = {"images": self.n_ok + self.n_error, "ok": self.n_ok, "error": self.n_error}
        self.manifest["shards"] = -(-self.n_ok // self.shard_size)
        write_json_atomic(self.out / MANIFEST, self.manifest)

    def close(self) -> None:
        """Commit what was added, fsync, close. (A run that dies instead is cut back to its last commit.)"""
        self.commit()
        for w in self._writers.values():
            w.close(fsync=True)
        os.fsync(self._index.fileno())
        self._index.close()
        self.write_manifest()
        if self._lock is not None:
            self._lock.close()  # releases the flock


# ---------------------------------------------------------------------------------------------- loading
class ShardedArray:
    """The shards of one array as one read-only sequence of rows, each shard memory-mapped (nothing is read until
    indexed): `a[i]`, `a[i:j]`, `a[[i, j, k]]`, `a[mask]`, `len(a)`, `a.shape`; `np.asarray(a)` reads it all.
    A single shard: `a.shards[0]` is a plain np.memmap."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self._starts = np.cumsum([0] + [len(s) for s in shards])
        first = shards[0] if shards else np.empty((0,))
        self.dtype = first.dtype
        self.shape = (int(self._starts[-1]), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        s = bisect_right(self._starts, i) - 1
        return self.shards[s][i - self._starts[s]]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # a[rows, ...]: rows first, then the rest on what they gave
            first = self[key[0]]
            return first[key[1:]] if isinstance(key[0], int | np.integer) else first[(slice(None), *key[1:])]
        if isinstance(key, int | np.integer):
            return self._row(int(key))
        if isinstance(key, slice):
            return self._take(np.arange(len(self))[key])
        idx = np.asarray(key)
        return self._take(np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64))

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        if not len(idx):
            return out
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"rows out of range for {len(self)}")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][idx[sel] - self._starts[s]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = np.concatenate(self.shards) if self.shards else np.empty(self.shape, self.dtype)
        return full if dtype is None else full.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"


def _parquet_output(out: str | Path) -> bool:
    """An output of mae-embed-ray (client.dataset.table): a remote URI, or a manifest that says so."""
    if "://" in str(out):
        return True
    path = Path(out) / MANIFEST
    return path.exists() and json.loads(path.read_text()).get("format") == PARQUET_FORMAT


def load_index(out: str | Path) -> dict[str, Any]:
    """Every row of the index, errors included, as columns: path, sha256, status, error (lists), shard, row (int64
    arrays, -1 where no row). `pandas.DataFrame(load_index(d))` takes it as is. Either output form."""
    if _parquet_output(out):
        return load_parquet_index(str(out))
    return read_index(Path(out))


def load_embeddings(out: str | Path, key: str | None = None) -> tuple[ShardedArray | np.ndarray, dict[str, Any]]:
    """(embeddings, index): one array of the output (`key`: cls, mean, patches or patch_indices; default: the run's
    pool, cls for pool=all), memory-mapped, and the index columns of the images it holds: `index["path"][i]` is
    the image of `embeddings[i]`. Either output form: embed-dataset's .npy shards, or mae-embed-ray's parquet
    (a numpy array then, read whole; `path` is the image's URI)."""
    if _parquet_output(out):
        return load_parquet(str(out), key)
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    arrays = manifest.get("arrays", {})
    if key is None:
        pool = manifest["parameters"]["pool"]
        key = pool if pool != "all" else ("cls" if "cls" in arrays else "mean")
    index = read_index(out)
    ok = select(index, index["shard"] >= 0)
    n = len(ok["path"])
    if key not in arrays:
        if not n:  # nothing embedded yet: an empty array
            return ShardedArray([]), ok
        raise KeyError(f"{out} has no {key!r} array; it has {sorted(arrays)}")
    size = manifest["parameters"]["shard_size"]
    shards = []
    for s in range(-(-n // size)):
        a = np.load(shard_file(out, key, s), mmap_mode="r")
        shards.append(a[: min(size, n - s * size)])  # a run in progress may have rows past the index
    return ShardedArray(shards), ok
