"""The two output forms of an embeddings run, side by side: embed-dataset's .npy shards (client.dataset.store) and
mae-embed-ray's parquet (client.dataset.table), for the same rows.

    python -m bench.embed_format [--rows 100000] [--dim 768] [--dtype float16] [--shard 10000]

Per form: bytes on disk; write seconds (.npy: the Store's appender, 1,000 rows a commit, as a run writes; parquet:
one file per shard of --shard rows, uncompressed as mae-embed-ray writes, and zstd); read seconds of the whole array
(`load_embeddings`: .npy memory-mapped then summed, so every page is read; parquet memory-mapped and decoded), and
of 1,000 random rows. Each timing is the median of 3, from the page cache. Writes bench/results/embed_format.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, table, write_json
from client.dataset import table as ptable
from client.dataset.store import ArraySpec, NpyAppender, load_embeddings, shard_file


def median_s(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shard", type=int, default=10_000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((a.rows, a.dim)).astype(a.dtype)
    pick = rng.choice(a.rows, 1000, replace=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-format-"))
    rows: list[dict[str, Any]] = []
    manifest = {"format": ptable.FORMAT, "parameters": {"pool": "cls"},
                "arrays": {"cls": {"dtype": a.dtype, "row_shape": [a.dim]}}}  # fmt: skip
    try:

        def write_npy() -> None:
            out = tmp / "npy"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            spec = ArraySpec(a.dtype, (a.dim,))
            for s in range(0, a.rows, a.shard):
                w = NpyAppender(shard_file(out, "cls", s // a.shard), spec, 0)
                for i in range(s, min(a.rows, s + a.shard), 1000):
                    w.append(emb[i : min(i + 1000, s + a.shard)])
                    w.sync()
                w.close()

        def write_parquet(compression: str | None) -> Any:
            def go() -> None:
                out = tmp / f"pq-{compression}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                names = []
                for s in range(0, a.rows, a.shard):
                    part = emb[s : s + a.shard]
                    n = len(part)
                    idx = {"uri": [f"s3://b/x/{i:09d}.jpg" for i in range(s, s + n)], "sha256": ["0" * 64] * n,
                           "status": ["ok"] * n, "error": [None] * n}  # fmt: skip
                    t = ptable.to_table(idx, {"cls": part}, {})
                    names.append(f"part-{s // a.shard:05d}")
                    ptable.write_table(t, str(out), names[-1], compression=compression)
                ptable.write_manifest(str(out), {**manifest, "order": names})

            return go

        for form, write in (
            ("npy", write_npy),
            ("parquet", write_parquet(None)),
            ("parquet zstd", write_parquet("zstd")),
        ):
            w = median_s(write)
            folder = tmp / ("npy" if form == "npy" else f"pq-{None if form == 'parquet' else 'zstd'}")
            if form == "npy":  # load_embeddings needs the index of the rows
                params = {"pool": "cls", "shard_size": a.shard}
                arrays = {"cls": {"dtype": a.dtype, "row_shape": [a.dim]}}
                npy_manifest = {"format": "mae-serve/embed-dataset/1", "parameters": params, "arrays": arrays}
                (folder / "manifest.json").write_text(json.dumps(npy_manifest))
                lines = "".join(f"{i:09d}.jpg,{'0' * 64},{i // a.shard},{i % a.shard},ok,\n" for i in range(a.rows))
                (folder / "index.csv").write_text("path,sha256,shard,row,status,error\n" + lines)
            whole = median_s(lambda f=folder: float(np.asarray(load_embeddings(f)[0], dtype=np.float32).sum()))
            some = median_s(lambda f=folder: load_embeddings(f)[0][pick])
            rows.append({"form": form, "mb": size_of(folder) / 1e6 if form == "npy" else size_of(folder) / 1e6,
                         "write_s": w, "read_all_s": whole, "read_1000_s": some})  # fmt: skip
            print(rows[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": machine(), "rows": a.rows, "dim": a.dim, "dtype": a.dtype, "shard": a.shard, "forms": rows}
    write_json("embed_format", result)
    cols = [("form", "", ""), ("mb", "MB on disk", ".1f"), ("write_s", "write s", ".3f"),
            ("read_all_s", "read all s", ".3f"), ("read_1000_s", "1,000 random rows s", ".3f")]  # fmt: skip
    print(table(rows, cols, title=f"{a.rows} x {a.dim} {a.dtype}, shards of {a.shard}"))


if __name__ == "__main__":
    main()
