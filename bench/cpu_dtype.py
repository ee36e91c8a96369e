"""bf16 against fp32 on this CPU: what it changes in the answers, and what it is worth bare and served.

    python -m bench.cpu_dtype [--parts fidelity,bare,served] [--repeats 3] [--omp auto]

- fidelity: the bundled model and a random ViT-B, each loaded once in fp32 and once cast to bf16 as MAE_DTYPE does,
  on the same photos and masks through the serving core (`model_thread.forward`): embedding cosine (CLS, mean) and
  the bf16 reconstruction's PSNR against the fp32 one, in uint8 pixels, and the `mse` fields.
- bare: the ViT-B's forward through `model_thread.forward` (uint8 in, results out), best batch of 1-16, fp32 and
  bf16, with the OpenMP wait policy mae-serve would choose here (each dtype in a fresh process: libgomp reads its
  policy once).
- served: mae-serve on the ViT-B, 8 closed-loop clients of multipart photos (bench/host_path.py's load), reconstruct
  PNG and embed CLS JSON, fp32 and bf16, each repeat running every variant in turn.
Writes bench/results/cpu_dtype.json; BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import numpy as np

from bench.common import BUNDLED, PYTHON, REPO, RESULTS, VITB_DIR, machine, median, photos, table, write_json

BATCHES = (1, 4, 8, 16)

_BARE = """
import json, sys, time, statistics
from app.serving import cpus
print(cpus.prepare_runtime(sys.argv[3]), file=sys.stderr)
import torch
from app.serving import model_thread
from app.serving.registry import ModelEntry
from model.formats import load
from model.masking import Masking, random_noise, len_keep_for_ratio
torch.set_num_threads(cpus.torch_threads_for(cpus.available_cpus()[0], on_gpu=False))
dtype = getattr(torch, sys.argv[2])
m = load(sys.argv[1]).model.to(dtype).eval()
e = ModelEntry("m", m, "", "", "", torch.device("cpu"), dtype)
n, size = m.config.num_patches, m.config.img_size
out = {}
for op in ("reconstruct", "embed"):
    for b in json.loads(sys.argv[4]):
        imgs = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8)
        mk = Masking(random_noise(b, n, seed=0), len_keep_for_ratio(n, 0.75)) if op == "reconstruct" else None
        model_thread.forward(e, op, imgs, mk)
        times = []
        t_end = time.perf_counter() + 3
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter(); model_thread.forward(e, op, imgs, mk); times.append(time.perf_counter() - t)
        out[f"{op}|{b}"] = b / statistics.median(times)
print(json.dumps(out))
"""


def fidelity(weights: str, pics: list[tuple[str, bytes]]) -> dict[str, Any]:
    import torch

    from app.serving import imaging, model_thread
    from app.serving.registry import ModelEntry
    from model.formats import load
    from model.masking import Masking, len_keep_for_ratio, random_noise

    fp32 = load(weights).model.eval()
    bf16 = load(weights).model.to(torch.bfloat16).eval()
    c = fp32.config
    images = torch.from_numpy(np.stack([imaging.load(d, c.img_size, "squash", 10**8) for _, d in pics]))
    entries = {d: ModelEntry("m", m, "", "", "", torch.device("cpu"), d) for d, m in
               ((torch.float32, fp32), (torch.bfloat16, bf16))}  # fmt: skip
    emb = {d: model_thread.forward(e, "embed", images, None) for d, e in entries.items()}
    n = c.num_patches
    masking = Masking(random_noise(len(pics), n, seed=7), len_keep_for_ratio(n, 0.75))
    rec = {d: model_thread.forward(e, "reconstruct", images, masking) for d, e in entries.items()}

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    a, b = emb[torch.float32], emb[torch.bfloat16]
    mean_cos = [cos(x.mean, y.mean) for x, y in zip(a, b, strict=True)]
    cls_cos = [cos(x.cls, y.cls) for x, y in zip(a, b, strict=True)] if a[0].cls is not None else []
    psnr, mse_rel = [], []
    for x, y in zip(rec[torch.float32], rec[torch.bfloat16], strict=True):
        d = x.pixels.astype(np.float64) - y.pixels.astype(np.float64)  # uint8 pixels of every patch
        err = float(np.mean(d**2))
        psnr.append(float("inf") if err == 0 else 10 * np.log10(255.0**2 / err))
        mse_rel.append(abs(x.mse - y.mse) / max(abs(x.mse), 1e-12))
    return {
        "weights": str(weights),
        "images": len(pics),
        "cls_cosine_min": min(cls_cos) if cls_cos else None,
        "cls_cosine_median": median(cls_cos) if cls_cos else None,
        "mean_cosine_min": min(mean_cos),
        "mean_cosine_median": median(mean_cos),
        "reconstruction_psnr_vs_fp32_min_db": min(psnr),
        "reconstruction_psnr_vs_fp32_median_db": median(psnr),
        "mse_field_relative_difference_median": median(mse_rel),
    }


def bare(weights: str, dtype: str, omp: str) -> dict[str, float]:
    r = subprocess.run([PYTHON, "-c", _BARE, weights, dtype, omp, json.dumps(BATCHES)], cwd=REPO,
                       capture_output=True, text=True, check=True, env=_clean_env())  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def main() -> None:
    from bench.host_path import HEADLINE_ROUTES, add_load_arguments, serve_routes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="fidelity,bare,served")
    ap.add_argument("--omp", default="auto", help="MAE_OMP_WAIT for the bare and served runs")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    add_load_arguments(ap)
    args = ap.parse_args()
    parts, dtypes = args.parts.split(","), args.dtypes.split(",")
    previous = RESULTS / "cpu_dtype.json"  # parts run separately add to one file
    out: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    out.update(benchmark="cpu_dtype", machine=machine(), omp=args.omp)
    pics = photos(max(args.images, 12))
    if "fidelity" in parts:
        out["fidelity"] = [fidelity(str(w), pics) for w in (BUNDLED, VITB_DIR)]
        for f in out["fidelity"]:
            print(json.dumps(f, indent=1))
        write_json("cpu_dtype", out)
    if "bare" in parts:
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for dt in dtypes:
                for key, v in bare(str(VITB_DIR), dt, args.omp).items():
                    runs.setdefault(f"{dt}|{key}", []).append(v)
        out["bare_runs"] = runs
        rows = []
        for dt in dtypes:
            for op in ("reconstruct", "embed"):
                best = max(BATCHES, key=lambda b, dt=dt, op=op: median(runs[f"{dt}|{op}|{b}"]))
                rows.append({"dtype": dt, "op": op, "best_batch": best,
                             "images_per_s": median(runs[f"{dt}|{op}|{best}"])})  # fmt: skip
        out["bare"] = rows
        print(table(rows, [("dtype", "dtype", ""), ("op", "op", ""), ("best_batch", "best batch", "d"),
                           ("images_per_s", "images/s", ".2f")], "bare ViT-B"))  # fmt: skip
        write_json("cpu_dtype", out)
    if "served" in parts:
        from bench.e2e import Server

        served: dict[str, list[dict[str, Any]]] = {}
        for rep in range(args.repeats):
            print(f"[bench] served: run {rep + 1} of {args.repeats}", flush=True)
            for dt in dtypes:
                env = {"MAE_DTYPE": dt, "MAE_OMP_WAIT": args.omp}
                server = Server("mae", str(VITB_DIR), env, label=f"mae-serve {dt}")
                for row in serve_routes(server, HEADLINE_ROUTES, pics[: args.images], args):
                    served.setdefault(f"{dt}|{row['route']}", []).append(row)
        rows = []
        for key, rs in served.items():
            dt, route = key.split("|")
            rows.append({"dtype": dt, "route": route, "images_per_s": median([r["images_per_s"] for r in rs]),
                         "runs": [r["images_per_s"] for r in rs],
                         "server_cpu_ms_per_image": median([r["server_cpu_ms_per_image"] for r in rs])})  # fmt: skip
        out["served"], out["served_runs"] = rows, served
        print(table(rows, [("dtype", "dtype", ""), ("route", "route", ""), ("images_per_s", "images/s", ".2f")],
                    "served ViT-B"))  # fmt: skip
        write_json("cpu_dtype", out)


if __name__ == "__main__":
    sys.exit(main())
