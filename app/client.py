"""A small Python client and the `mae-client` command.

mae-client reconstruct photo.jpg -o out.png --mask-ratio 0.6 --seed 3
mae-client embed photo.jpg -o emb.npy --pool cls
mae-client models

from app.client import MAEClient
with MAEClient("http://127.0.0.1:8000") as c:
    png = c.reconstruct("photo.jpg", mask_ratio=0.6, seed=3)
    emb = c.embed("photo.jpg")  # dict with cls / mean / patches as numpy arrays
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class MAEError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _image_bytes(image: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"
    p = Path(image)
    return p.read_bytes(), _TYPES.get(p.suffix.lower(), "application/octet-stream")


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
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
