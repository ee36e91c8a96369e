"""One embedding job on a Ray cluster: the source's shards in, one parquet file per shard out (client.dataset.table).

The driver lists the source (client.dataset.storage), skips the shards whose file is already in the output (a
rerun resumes; the output says what is done, nothing else), and streams the rest through the stages of
app.raydata.stages. Rows come back in any order; a shard is written, in its own order, as soon as all its rows are
in (its last row says how many), and the manifest then records its counts and the node ids that embedded it. A
job that dies loses only the shards it had not written. Node failures are Ray's to absorb (tasks retried, actors
restarted); rows that come twice from a retried task are kept once.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from app.raydata.stages import Embedder, ShardSource, decode_batch, keys_for, load_entry
from app.settings import Settings
from client.dataset import table
from client.dataset.storage import Shard, expand, public_uri
from client.vocabulary import check_options
from model.masking import len_keep_for_ratio

DEFAULT_SHARD_SIZE = 10_000


@dataclass
class Options:
    src: str
    out: str
    weights: str = ""  # MAE_WEIGHTS form: a path or URI, or name=path,...; empty: MAE_WEIGHTS, else the demo model
    model: str | None = None
    pool: str = "cls"
    dtype: str = "float32"
    mask_ratio: float = 0.0
    seed: int | None = None  # with mask_ratio > 0: one seeded mask for the whole job, default 0
    resize: str = "squash"
    shard_size: int = DEFAULT_SHARD_SIZE  # loose image files per source shard (a tar or parquet is one shard)
    image_column: str | None = None  # of a parquet source; default: image, jpg, png, ... or the first binary column
    address: str | None = None  # of the Ray cluster; None: RAY_ADDRESS, else a local one
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    concurrency: int | None = None  # model actors; None: the cluster's GPUs (or a CPU actor per 2 CPUs)
    cpus_per_actor: float = 1.0
    batch_size: int | None = None  # images per model call; None: MAE_MAX_BATCH_SIZE on GPU, MAE_CPU_MAX_BATCH_SIZE
    progress: bool = True
    forward: str | None = None  # "module:function": another Forward for the model call (tests)

    def check(self) -> None:
        check_options(
            self.pool,
            self.dtype,
            self.resize,
            self.mask_ratio,
            {"concurrency": self.concurrency, "batch_size": self.batch_size, "shard_size": self.shard_size},
        )


@dataclass
class Summary:
    status: str  # complete | failed
    shards: int = 0  # of the source
    skipped: int = 0  # shards already in the output
    written: int = 0  # shards written by this job
    images: int = 0  # rows written by this job
    embedded: int = 0
    errors: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    actors: int = 0
    num_gpus: float = 0.0
    batch_size: int = 0
    nodes: dict[str, list[str]] = field(default_factory=dict)  # shard name -> node ids
    message: str = ""


class OutputError(RuntimeError):
    """The output holds another job's results (other model or parameters): the message says what to do."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - the extra is missing
        raise SystemExit("mae-embed-ray needs Ray Data: pip install 'mae-serve[ray]'") from None
    return ray


def _identity(entry: Any, opts: Options, seed: int | None) -> dict[str, Any]:
    d = entry.describe()
    model = {k: d.get(k) for k in ("name", "architecture", "weights_sha256", "embed_dim", "image_size",
                                          "patch_size", "grid", "family")}  # fmt: skip
    parameters = {"pool": opts.pool, "dtype": opts.dtype, "mask_ratio": opts.mask_ratio, "seed": seed,
                  "resize": opts.resize, "shard_size": opts.shard_size}  # fmt: skip
    return {"model": model, "parameters": parameters}


def _plan(ray: Any, opts: Options, settings: Settings) -> tuple[float, int, int]:
    """(GPUs per actor, actors, images per model call) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
    num_gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if opts.concurrency is not None:
        actors = opts.concurrency
    elif num_gpus > 0:
        actors = max(1, int(gpus // num_gpus))
    else:
        actors = max(1, int(cpus // (2 * opts.cpus_per_actor)))  # the other half decodes
    batch = opts.batch_size or (settings.max_batch_size if num_gpus > 0 else settings.cpu_max_batch_size)
    return num_gpus, actors, batch


def run(opts: Options) -> Summary:
    """Embed opts.src into opts.out on the Ray cluster (see the module's docstring)."""
    opts.check()
    ray = _ray()
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    seed = opts.seed if opts.seed is not None or opts.mask_ratio == 0 else 0
    settings = Settings(weights=opts.weights) if opts.weights else Settings()
    weights = settings.weights or ",".join(f"{n}={p}" for n, p in settings.weight_specs())
    entry = load_entry(weights, opts.model, "cpu")  # the driver's copy: identity, shapes, a wrong name fails here
    if opts.pool == "cls" and not entry.config.has_cls:
        raise ValueError("this model has no CLS token; use --pool mean")
    identity = _identity(entry, opts, seed)
    c = entry.config
    k = c.num_patches if opts.mask_ratio == 0 else len_keep_for_ratio(c.num_patches, opts.mask_ratio)
    shapes = {"cls": [c.embed_dim], "mean": [c.embed_dim], "patches": [k, c.embed_dim], "patch_indices": [k]}
    arrays = {key: {"dtype": "int64" if key == "patch_indices" else opts.dtype, "row_shape": shapes[key]}
              for key in keys_for(entry, opts.pool)}  # fmt: skip

    shards = expand(opts.src, opts.shard_size)
    names = [s.name for s in shards]
    manifest = table.read_manifest(opts.out)
    if manifest is not None:
        for key, want in identity.items():
            if manifest.get(key) != want:
                raise OutputError(f"{opts.out} holds a job with {key} {manifest.get(key)}, not {want}: resume with "
                                  "the same settings, or choose another --out")  # fmt: skip
    manifest = manifest or {"format": table.FORMAT, **identity, "shards": {}, "runs": []}
    manifest.update(arrays=arrays, order=names, status="running",
                    source={"uri": public_uri(opts.src), "shards": len(shards)})  # fmt: skip
    done = table.finished(opts.out) & set(names)
    todo = [(i, s) for i, s in enumerate(shards) if s.name not in done]
    table.write_manifest(opts.out, manifest)

    if opts.address is not None or not ray.is_initialized():
        ray.init(address=opts.address, ignore_reinit_error=True, log_to_driver=False)
    num_gpus, actors, batch = _plan(ray, opts, settings)
    summary = Summary(status="running", shards=len(shards), skipped=len(shards) - len(todo), actors=actors,
                      num_gpus=num_gpus, batch_size=batch)  # fmt: skip
    print(f"mae-embed-ray: {entry.name} ({c.name}); {len(todo)} of {len(shards)} shard(s) to embed; {actors} "
          f"actor(s), {num_gpus:g} GPU each, {batch} images a call", file=sys.stderr)  # fmt: skip
    try:
        if todo:
            _stream(ray, opts, todo, entry, weights, seed, settings, (num_gpus, actors, batch), manifest, summary)
        summary.status = "complete"
    except BaseException as e:
        summary.status, summary.message = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        summary.seconds = time.monotonic() - t0
        summary.images_per_s = summary.embedded / summary.seconds if summary.seconds else 0.0
        manifest["status"] = summary.status
        run_record = {k: v for k, v in asdict(summary).items() if k != "nodes"}
        manifest["runs"].append({"started": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                                 **run_record})  # fmt: skip
        manifest["counts"] = {
            "images": sum(s["rows"] for s in manifest["shards"].values()),
            "ok": sum(s["ok"] for s in manifest["shards"].values()),
            "error": sum(s["errors"] for s in manifest["shards"].values()),
        }
        with contextlib.suppress(Exception):
            table.write_manifest(opts.out, manifest)
    return summary


def _stream(
    ray: Any,
    opts: Options,
    todo: list[tuple[int, Shard]],
    entry: Any,
    weights: str,
    seed: int | None,
    settings: Settings,
    plan: tuple[float, int, int],
    manifest: dict[str, Any],
    summary: Summary,
) -> None:
    num_gpus, actors, batch = plan
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = opts.progress
    ctx.wait_for_min_actors_s = 600  # every model actor loaded before work is handed out, so it spreads over them all
    positions = [i for i, _ in todo]
    by_pos = dict(todo)
    source = ShardSource([s for _, s in todo], positions, settings.max_body_bytes, opts.image_column)
    ds = ray.data.read_datasource(source, override_num_blocks=len(todo))
    prep = {"size": entry.config.img_size, "resize": opts.resize, "settings": settings}
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=batch, num_cpus=1, fn_kwargs=prep)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"weights": weights, "model": entry.name, "pool": opts.pool, "dtype": opts.dtype,
                               "mask_ratio": opts.mask_ratio, "seed": seed or 0,
                               "threads": max(1, int(opts.cpus_per_actor)), "forward": opts.forward},  # fmt: skip
        batch_format="numpy", batch_size=batch, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus,
        num_cpus=opts.cpus_per_actor, scheduling_strategy="SPREAD",  # model actors on as many nodes as there are
    )  # fmt: skip
    keys = list(manifest["arrays"])
    t_start = time.monotonic()
    pending: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    last: dict[int, int] = {}
    started: dict[int, float] = {}

    def write(pos: int) -> None:
        rows = pending.pop(pos, {})
        order = sorted(rows)
        shard = by_pos[pos]
        index = {c: [rows[i][c] for i in order] for c in table.INDEX_COLUMNS}
        specs = manifest["arrays"]
        arrays = {k: np.stack([rows[i][k] for i in order]) if order else
                  np.zeros((0, *specs[k]["row_shape"]), specs[k]["dtype"]) for k in keys}  # fmt: skip
        meta = {"format": table.FORMAT, "source": public_uri(shard.uri), "shard": shard.name,
                "model": manifest["model"], "parameters": manifest["parameters"]}  # fmt: skip
        fname = table.write_table(table.to_table(index, arrays, meta), opts.out, shard.name)
        nodes = sorted({rows[i]["node"] for i in order})
        decode_nodes = sorted({rows[i]["decode_node"] for i in order})
        ok = sum(s == "ok" for s in index["status"])
        manifest["shards"][shard.name] = {
            "file": fname, "source": public_uri(shard.uri), "rows": len(order), "ok": ok, "errors": len(order) - ok,
            "nodes": nodes, "decode_nodes": decode_nodes,
            "seconds": round(time.monotonic() - started.get(pos, time.monotonic()), 3),
            "written_at_s": round(time.monotonic() - t_start, 3),  # since this job's stream started
        }  # fmt: skip
        table.write_manifest(opts.out, manifest)
        summary.written += 1
        summary.images += len(order)
        summary.embedded += ok
        summary.errors += len(order) - ok
        summary.nodes[shard.name] = nodes

    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j in range(len(b["uri"])):
            pos, i = int(b["shard"][j]), int(b["index"][j])
            started.setdefault(pos, time.monotonic())
            error = b["error"][j]
            row = {"uri": str(b["uri"][j]), "sha256": str(b["sha256"][j]), "status": str(b["status"][j]),
                   "node": str(b["node"][j]), "decode_node": str(b["decode_node"][j]),
                   "error": error if isinstance(error, str) else None,
                   **{k: b[k][j] for k in keys}}  # fmt: skip
            pending[pos][i] = row  # a retried task's rows replace their first copies
            if bool(b["last"][j]):
                last[pos] = i
        for pos in [p for p in pending if p in last and len(pending[p]) == last[p] + 1]:
            write(pos)
    for pos in positions:  # the stream ended whole: every shard is in (an empty one has no rows at all)
        if by_pos[pos].name not in manifest["shards"] or pos in pending:
            write(pos)
