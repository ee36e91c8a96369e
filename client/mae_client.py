"""A small Python client and the `mae-client` command.

mae-client reconstruct photo.jpg -o out.png --mask-ratio 0.6 --seed 3
mae-client embed photo.jpg -o emb.npy --pool cls
mae-client embed-dataset photos/ --out emb/ --pool cls   # a folder, a list of paths or a .tar; resumable
mae-client models

from client.mae_client import MAEClient
with MAEClient("http://127.0.0.1:8000") as c:
    png = c.reconstruct("photo.jpg", mask_ratio=0.6, seed=3)
    emb = c.embed("photo.jpg")  # dict with cls / mean / patches as numpy arrays
emb, rows = load_embeddings("emb/")  # an embed-dataset output: memory-mapped rows, rows[i] describes emb[i]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from client.dataset import load_embeddings, load_index
from client.dataset.runner import DEFAULT_SHARD_SIZE, Options, Summary, run
from client.dataset.send import Fatal
from client.dataset.store import StoreError
from client.vocabulary import DTYPES, POOLS, RESIZES, media_type

__all__ = ["MAEClient", "MAEError", "load_embeddings", "load_index", "main"]


class MAEError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _image_bytes(image: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"
    p = Path(image)
    return p.read_bytes(), media_type(p.name)


def _params(**kw: Any) -> dict[str, str]:
    out = {}
    for k, v in kw.items():
        if v is None:
            continue
        out[k] = ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
    return out


class MAEClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> MAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, image: str | Path | bytes, params: dict[str, str]) -> httpx.Response:
        data, ctype = _image_bytes(image)
        r = self.http.post(path, params=params, content=data, headers={"Content-Type": ctype})
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise MAEError(err["status"], err["code"], err["message"])
            except (ValueError, KeyError):
                raise MAEError(r.status_code, "http_error", r.text[:200]) from None
        return r

    def reconstruct(
        self,
        image: str | Path | bytes,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        mask: list[int] | None = None,
        view: str = "paste",
        format: str = "png",
        model: str | None = None,
    ) -> Any:
        """PNG bytes (format=png) or the JSON result (format=json)."""
        p = _params(mask_ratio=mask_ratio, seed=seed, mask=mask, view=view, format=format, model=model)
        r = self._post("/v1/reconstruct", image, p)
        return r.content if format == "png" else r.json()

    def embed(
        self,
        image: str | Path | bytes,
        *,
        pool: str = "all",
        mask_ratio: float | None = None,
        seed: int | None = None,
        mask: list[int] | None = None,
        dtype: str = "float32",
        model: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeddings as numpy arrays (fetched as npz, the compact binary form)."""
        p = _params(pool=pool, mask_ratio=mask_ratio, seed=seed, mask=mask, format="npz", dtype=dtype, model=model)
        r = self._post("/v1/embed", image, p)
        with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def models(self) -> dict[str, Any]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mae-client", description="Talk to a mae-serve server.")
    ap.add_argument("--url", default=os.environ.get("MAE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=os.environ.get("MAE_API_KEY"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("reconstruct", help="write the reconstruction as PNG (or JSON with --json)")
    rec.add_argument("image")
    rec.add_argument("-o", "--out", required=True)
    rec.add_argument("--mask-ratio", type=float)
    rec.add_argument("--seed", type=int)
    rec.add_argument("--mask", help="explicit masked patch indices, comma-separated")
    rec.add_argument("--view", default="paste")
    rec.add_argument("--json", action="store_true", help="write the JSON result (every view) instead")
    rec.add_argument("--model")
    emb = sub.add_parser("embed", help="write embeddings: .npy (one array) or .npz (all), by the file's suffix")
    emb.add_argument("image")
    emb.add_argument("-o", "--out", required=True)
    emb.add_argument("--pool", default=None, help="all|cls|mean|patches (default: cls for .npy, all for .npz)")
    emb.add_argument("--mask-ratio", type=float)
    emb.add_argument("--seed", type=int)
    emb.add_argument("--dtype", default="float32")
    emb.add_argument("--model")
    sub.add_parser("models", help="print the loaded models")
    _add_embed_dataset(sub)
    a = ap.parse_args(argv)
    if a.cmd == "embed-dataset":
        raise SystemExit(_embed_dataset(a))
    try:
        with MAEClient(a.url, a.api_key) as c:
            if a.cmd == "models":
                print(json.dumps(c.models(), indent=2))
            elif a.cmd == "reconstruct":
                mask = [int(i) for i in a.mask.split(",")] if a.mask else None
                fmt = "json" if a.json else "png"
                out = c.reconstruct(
                    a.image, mask_ratio=a.mask_ratio, seed=a.seed, mask=mask, view=a.view, format=fmt, model=a.model
                )
                Path(a.out).write_bytes(out if fmt == "png" else json.dumps(out).encode())
                print(f"wrote {a.out}")
            else:
                npy = a.out.endswith(".npy")
                pool = a.pool or ("cls" if npy else "all")
                arrays = c.embed(a.image, pool=pool, mask_ratio=a.mask_ratio, seed=a.seed, dtype=a.dtype, model=a.model)
                if npy:
                    key = "mean" if pool == "all" else pool
                    np.save(a.out, arrays[key])
                else:
                    np.savez(a.out, **arrays)  # type: ignore[arg-type]
                print(f"wrote {a.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()))
    except MAEError as e:
        print(f"mae-client: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except httpx.HTTPError as e:
        print(f"mae-client: cannot reach {a.url}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


# ---------------------------------------------------------------------------------------------- embed-dataset
def _add_embed_dataset(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser(
        "embed-dataset",
        help="embed every image of a folder, a list of paths or a .tar into .npy shards + index.csv (resumable)",
        description="Embed a dataset through the server. Run the same command again to resume: images the index "
        "already holds (same path, same sha256) are skipped. Ctrl-C stops after the requests in flight.",
    )
    ds.add_argument("src", help="a folder (recursive), a text file of paths (one a line) or a .tar of images")
    ds.add_argument("--out", required=True, help="output folder (created; the same one to resume)")
    ds.add_argument("--pool", default="cls", choices=POOLS, help="which embeddings to keep (default: cls)")
    ds.add_argument("--dtype", default="float32", choices=DTYPES)
    ds.add_argument("--mask-ratio", type=float, default=0.0, help="fraction of patches hidden (default 0: none)")
    ds.add_argument("--seed", type=int, help="the mask's seed when --mask-ratio > 0 (default 0; one mask for all)")
    ds.add_argument("--model", help="model name, when the server has several (default: its default)")
    ds.add_argument("--resize", default="squash", choices=RESIZES)
    ds.add_argument("--concurrency", type=int, help="requests in flight (default: from the server's batch cap)")
    ds.add_argument("--batch", type=int, help="images per request (default: the server's batch cap)")
    ds.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per .npy shard")
    ds.add_argument("--max-retries", type=int, default=10, help="retries of a request on 503/504/connection errors")
    ds.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one answer")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")


def _embed_dataset(a: argparse.Namespace) -> int:
    """0 complete (per-image errors are in the index), 130 interrupted, 1 failed; both resumable."""
    opts = Options(
        src=a.src, out=a.out, url=a.url, api_key=a.api_key, pool=a.pool, dtype=a.dtype, mask_ratio=a.mask_ratio,
        seed=a.seed, model=a.model, resize=a.resize, concurrency=a.concurrency, batch=a.batch,
        shard_size=a.shard_size, max_retries=a.max_retries, timeout_s=a.timeout, progress=not a.no_progress,
    )  # fmt: skip

    async def main() -> Summary:
        stop, task = asyncio.Event(), asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            if not stop.is_set():  # first Ctrl-C: read no further, finish and write what is in flight
                stop.set()
                print("\nmae-client: stopping after the requests in flight (Ctrl-C again: at once)", file=sys.stderr)
            else:
                task.cancel()  # second: drop them; the output stays consistent all the same

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await run(opts, stop)

    try:
        s = asyncio.run(main())
    except (Fatal, StoreError, ValueError, OSError) as e:
        print(f"mae-client: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):  # before the run began: nothing was written
        print("mae-client: interrupted", file=sys.stderr)
        return 130
    line = (f"{s.status}: {s.embedded} embedded, {s.errors} errors, {s.skipped} already there, in {s.seconds:.1f} s "
            f"({s.images_per_s:.1f} img/s; {s.retries} retries) -> {a.out}")  # fmt: skip
    print(f"mae-client: {line}", file=sys.stderr)
    if s.status == "failed":
        print(f"mae-client: {s.message}\nmae-client: run the same command again to resume", file=sys.stderr)
        return 1
    return 130 if s.status == "interrupted" else 0


if __name__ == "__main__":
    main()
