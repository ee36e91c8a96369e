"""The obvious alternative: a plain FastAPI + transformers server, as one writes it in an afternoon.

    python bench/baseline_server.py --weights bench/.weights/vit-mae-base-random --port 8100 [--style async|sync]

One image per request (multipart field `image`), PIL decode, the checkpoint's own image processor
(AutoImageProcessor = ViTImageProcessor: resize 224 bicubic, rescale, normalise), the model under torch.no_grad:

- POST /v1/reconstruct: `ViTMAEForPreTraining` (mask ratio from its config, 0.75), the HF demo's recipe
  (unpatchify the logits, paste the visible patches back), PNG via PIL's default `save(format="PNG")`;
- POST /v1/embed?pool=cls|mean: a `ViTMAEModel` loaded with mask_ratio=0.0, the CLS token or the mean of the
  patch tokens of last_hidden_state as a JSON list;
- GET /readyz.

--style async (default): `async def` endpoints that call the model inline, the most common tutorial form;
requests run one at a time on the event loop. --style sync: plain `def` endpoints, which FastAPI runs in its
thread pool, so several requests run the model at once, each with torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import Response
from PIL import Image
from transformers import AutoImageProcessor, ViTMAEForPreTraining, ViTMAEModel


def build_app(weights: str, style: str) -> FastAPI:
    processor = AutoImageProcessor.from_pretrained(weights)
    pretraining = ViTMAEForPreTraining.from_pretrained(weights).eval()
    encoder = ViTMAEModel.from_pretrained(weights, mask_ratio=0.0).eval()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    app = FastAPI(title="baseline")

    def reconstruct_png(data: bytes) -> bytes:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = pretraining(pixel_values=pixel_values)
        pred = pretraining.unpatchify(out.logits)
        mask = out.mask.unsqueeze(-1).repeat(1, 1, pretraining.config.patch_size**2 * 3)
        mask = pretraining.unpatchify(mask)
        paste = pixel_values * (1 - mask) + pred * mask
        pixels = ((paste * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    def embed_vector(data: bytes, pool: str) -> list[float]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state[0]
        if pool == "cls":
            return hidden[0].tolist()
        if pool == "mean":
            return hidden[1:].mean(dim=0).tolist()
        raise HTTPException(422, "pool must be cls or mean")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    if style == "async":

        @app.post("/v1/reconstruct")
        async def reconstruct(image: UploadFile = File(...)) -> Response:
            return Response(reconstruct_png(await image.read()), media_type="image/png")

        @app.post("/v1/embed")
        async def embed(image: UploadFile = File(...), pool: str = "cls") -> dict:
            return {"pool": pool, "embedding": embed_vector(await image.read(), pool)}

    else:

        @app.post("/v1/reconstruct")
        def reconstruct_sync(image: UploadFile = File(...)) -> Response:
            return Response(reconstruct_png(image.file.read()), media_type="image/png")

        @app.post("/v1/embed")
        def embed_sync(image: UploadFile = File(...), pool: str = "cls") -> dict:
            return {"pool": pool, "embedding": embed_vector(image.file.read(), pool)}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="plain FastAPI + transformers ViTMAE server (benchmark baseline)")
    ap.add_argument("--weights", required=True, help="a Hugging Face ViTMAE directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--style", choices=["async", "sync"], default="async")
    args = ap.parse_args()
    uvicorn.run(build_app(args.weights, args.style), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
