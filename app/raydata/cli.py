"""mae-embed-ray SRC --out DST: embed a dataset on a Ray cluster (README "Embed a dataset on a cluster")."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from app.raydata.job import DEFAULT_SHARD_SIZE, Options, OutputError, run
from client.dataset.storage import SourceError
from client.vocabulary import DTYPES, POOLS, RESIZES


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mae-embed-ray",
        description="Embed a dataset with mae-serve's model and preprocessing on a Ray cluster; parquet out, "
        "resumable by source shard. Credentials come from the environment and fsspec's config, never from here.",
    )
    ap.add_argument("src", help="folder, file list, tar(s) or parquet(s): local or s3://, gs://, hf://, https://; "
                    "globs and brace ranges (shard-{000000..000099}.tar)")  # fmt: skip
    ap.add_argument("--out", required=True, help="output folder, local or remote (the same one to resume)")
    ap.add_argument("--weights", default="", help="a path or URI, or name=path,...; default: MAE_WEIGHTS")
    ap.add_argument("--model", help="model name, when the weights give several")
    ap.add_argument("--pool", default="cls", choices=POOLS, help="which embeddings to keep (default: cls)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--mask-ratio", type=float, default=0.0, help="fraction of patches hidden (default 0: none)")
    ap.add_argument("--seed", type=int, help="the mask's seed when --mask-ratio > 0 (default 0; one mask for all)")
    ap.add_argument("--resize", default="squash", choices=RESIZES)
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                    help="loose image files per source shard (a tar or parquet file is one shard)")  # fmt: skip
    ap.add_argument("--image-column", help="a parquet source's image-bytes column (default: image, jpg, png, ...)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    ap.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 on a GPU cluster, else 0)")
    ap.add_argument("--concurrency", type=int, help="model actors (default: one per GPU, or per 2 CPUs)")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per model actor (its torch threads)")
    ap.add_argument("--batch-size", type=int, help="images per model call (default: MAE_MAX_BATCH_SIZE on GPU, "
                    "MAE_CPU_MAX_BATCH_SIZE on CPU)")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    opts = Options(
        src=a.src, out=a.out, weights=a.weights, model=a.model, pool=a.pool, dtype=a.dtype, mask_ratio=a.mask_ratio,
        seed=a.seed, resize=a.resize, shard_size=a.shard_size, image_column=a.image_column, address=a.address,
        num_gpus=a.num_gpus, concurrency=a.concurrency, cpus_per_actor=a.cpus_per_actor, batch_size=a.batch_size,
        progress=not a.no_progress,
    )  # fmt: skip
    try:
        s = run(opts)
    except (ValueError, SourceError, OutputError) as e:
        print(f"mae-embed-ray: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in asdict(s).items() if k != "nodes"}))
    return 0 if s.status == "complete" else 1


if __name__ == "__main__":
    raise SystemExit(main())
