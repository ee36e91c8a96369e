"""The embed-dataset index as CSV (what client/dataset/store.py writes) against Parquet (pyarrow), for N rows.

    python -m bench.index_format [--rows 100000]     # Parquet's half needs `pip install pyarrow` (not a dependency)

Measures, for an index like a real one (ImageNet-style paths, sha256 hex, shard, row, status, 2% errors):
- writing it the way a run must: appended and flushed as answers arrive (one commit per 4 rows, as in a run of
  4-image requests). CSV: lines appended to the file. Parquet cannot be appended to: a run would keep this very
  journal and write the Parquet file at the end, so its cost is the journal's plus one conversion;
- reading it back into Python columns (store.read_index; pyarrow.parquet.read_table(...).to_pydict());
- what a killed writer leaves: a CSV journal readable up to its last line; a pyarrow ParquetWriter not closed: no
  footer, not readable at all;
- file sizes, `import pyarrow.parquet` time, pyarrow's installed size.
Writes bench/results/index_format.json.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_json
from client.dataset.store import COLUMNS, INDEX, Store, read_index


def fake_rows(n: int) -> list[tuple]:
    rows, ok = [], 0
    for i in range(n):
        path = f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i:06d}.JPEG"
        sha = hashlib.sha256(path.encode()).hexdigest()
        if i % 50 == 7:
            rows.append((path, sha, "", "", "error", "400 undecodable: cannot read the JPEG header"))
        else:
            rows.append((path, sha, ok // 10_000, ok % 10_000, "ok", ""))
            ok += 1
    return rows


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def csv_side(rows: list[tuple], work: Path) -> dict[str, Any]:
    def write() -> None:
        out = work / "csv"
        out.mkdir(exist_ok=True)
        (out / INDEX).unlink(missing_ok=True)
        ident = {"model": {}, "parameters": {"shard_size": 10_000}}
        (out / "manifest.json").unlink(missing_ok=True)
        st = Store.open(out, ident, {})
        for i, r in enumerate(rows):
            st._csv.writerow(r)  # the index line as add_ok / add_error write it (no shard rows: the index alone)
            if i % 4 == 3:
                st.commit()
        st.close()

    write_s = best_of(write)
    read_s = best_of(lambda: read_index(work / "csv"))
    return {"write_journal_s": write_s, "read_s": read_s, "bytes": (work / "csv" / INDEX).stat().st_size}


def parquet_side(rows: list[tuple], work: Path) -> dict[str, Any] | None:
    t = time.perf_counter()
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    import_s = time.perf_counter() - t
    cols = list(zip(*rows, strict=True))
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("shard", pa.int32()),
                        ("row", pa.int32()), ("status", pa.string()), ("error", pa.string())])  # fmt: skip

    def table() -> Any:
        ints = [[None if v == "" else v for v in c] for c in cols[2:4]]
        return pa.table([list(cols[0]), list(cols[1]), *ints, list(cols[4]), list(cols[5])], schema=schema)

    path = work / "index.parquet"
    convert_s = best_of(lambda: pq.write_table(table(), path))
    read_s = best_of(lambda: pq.read_table(path).to_pydict())  # columns, as read_index gives
    # A writer killed before close(): row groups on disk, no footer.
    torn = work / "torn.parquet"
    code = "\n".join([
        "import os, pyarrow as pa, pyarrow.parquet as pq",
        f"w = pq.ParquetWriter({str(torn)!r}, pa.schema([('path', pa.string())]))",
        "w.write_table(pa.table({'path': ['a'] * 1000}))",
        "os._exit(9)",
    ])  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=False)
    try:
        pq.read_table(torn)
        torn_readable = True
    except Exception as e:  # pyarrow.lib.ArrowInvalid: no magic bytes / footer
        torn_readable, torn_error = False, f"{type(e).__name__}: {e}"
    site = Path(pa.__file__).parent
    installed = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    return {
        "pyarrow": pa.__version__, "import_s": import_s, "convert_at_end_s": convert_s, "read_s": read_s,
        "bytes": path.stat().st_size, "killed_writer_readable": torn_readable,
        "killed_writer_error": None if torn_readable else torn_error[:200], "installed_mb": installed / 2**20,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default="index_format")
    args = ap.parse_args(argv)
    rows = fake_rows(args.rows)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        csv = csv_side(rows, work)
        parquet = parquet_side(rows, work)
    result = {"benchmark": "index_format", "machine": machine(), "rows": args.rows, "columns": COLUMNS,
              "csv": csv, "parquet": parquet}  # fmt: skip
    mib = 2**20
    print(f"{args.rows} index rows")
    print(f"  CSV journal (store.py): written as a run does {csv['write_journal_s']:.2f} s, "
          f"read {csv['read_s']:.2f} s, {csv['bytes'] / mib:.1f} MiB")  # fmt: skip
    if parquet:
        p = parquet
        print(
            f"  Parquet (pyarrow {p['pyarrow']}): + {p['convert_at_end_s']:.2f} s to convert at the end, "
            f"read {p['read_s']:.2f} s, {p['bytes'] / mib:.1f} MiB; import {p['import_s']:.2f} s, "
            f"installed {p['installed_mb']:.0f} MiB; a killed writer's file readable: "
            f"{p['killed_writer_readable']}"
        )
    else:
        print("  Parquet: pyarrow is not installed (pip install pyarrow to measure it)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
