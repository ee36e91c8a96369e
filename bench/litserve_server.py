"""A peer for the benchmarks: the same MAE served by LitServe, written its documented way.

    python bench/litserve_server.py --weights W --port P [--max-batch-size 4] [--batch-timeout 0.005] [--workers 1]
        [--dtype float32|bfloat16]

LitAPI with dynamic batching (max_batch_size / batch_timeout), the same weights loaded by model.formats, its own
image recipe (Pillow decode, bicubic resize to the model's size, to a tensor), the same input form as mae-serve's
JSON body ({"image": "<base64>"}) and equal work:
  /reconstruct  -> masked 75 % with a seed, the paste view as a PNG (base64 in JSON: LitServe answers JSON)
  /embed        -> the CLS embedding as a JSON list (mae-serve's pool=cls)
Each path is its own LitServer process (LitServe serves one API per server): --op reconstruct|embed.
"""

# No `from __future__ import annotations`: LitServe hands decode_request's annotation to FastAPI, which would read
# a string annotation as a query parameter (every request a 422).
import argparse
import base64
import io
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.formats import load  # noqa: E402
from model.masking import Masking, len_keep_for_ratio, random_noise  # noqa: E402


class MAEAPI(ls.LitAPI):
    def __init__(self, weights: str, op: str, dtype: str = "float32", **kw: Any) -> None:
        super().__init__(**kw)
        self.weights, self.op, self.dtype = weights, op, getattr(torch, dtype)

    def setup(self, device: str) -> None:
        self.model = load(self.weights).model.to(self.dtype).eval()  # bf16: the whole model cast, as MAE_DTYPE does
        self.size = self.model.config.img_size

    def decode_request(self, request: dict[str, Any]) -> torch.Tensor:
        im = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        im = im.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> Any:
        x = x.to(self.dtype)
        with torch.inference_mode():
            if self.op == "embed":
                return self.model.encode(x).cls.float()
            n = self.model.config.num_patches
            masking = Masking(random_noise(x.shape[0], n, seed=3), len_keep_for_ratio(n, 0.75))
            return self.model.reconstruct(x, masking).paste.float()

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        if self.op == "embed":
            return {"cls": output.tolist()}
        a = (output.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=1)
        return {"png": base64.b64encode(buf.getvalue()).decode("ascii")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--op", choices=("reconstruct", "embed"), required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--batch-timeout", type=float, default=0.005)
    ap.add_argument("--workers", type=int, default=1, help="LitServe's workers_per_device")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    api = MAEAPI(args.weights, args.op, args.dtype, max_batch_size=args.max_batch_size,
                 batch_timeout=args.batch_timeout, api_path=f"/{args.op}")  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, healthcheck_path="/readyz")
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
