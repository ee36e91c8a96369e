"""The X-MAE-* answer headers, in one place: what a binary or image answer says about itself (the JSON answers
carry the same facts in their bodies). Every front-end that sets them calls `answer_headers`."""

from __future__ import annotations

from app.serving.pipeline import EmbedAnswer, ReconstructAnswer


def answer_headers(r: ReconstructAnswer | EmbedAnswer, view: str | None = None) -> dict[str, str]:
    """Model, seed ("" for an explicit mask), mask ratio and grid; a reconstruction adds its mask, MSE, PSNR and
    `view`, an embedding its width."""
    grid = r.out.grid
    headers = {
        "X-MAE-Model": r.model.name,
        "X-MAE-Seed": "" if r.seed is None else str(r.seed),
        "X-MAE-Mask-Ratio": f"{r.mask_ratio:.6g}",
        "X-MAE-Grid": f"{grid[0]}x{grid[1]}",
    }
    if isinstance(r, ReconstructAnswer):
        psnr = r.out.psnr
        headers |= {
            "X-MAE-Mask": ",".join(map(str, r.mask_indices)),
            "X-MAE-MSE": f"{r.out.mse:.6g}",
            "X-MAE-PSNR": "" if psnr is None else f"{psnr:.4f}",
        }
        if view is not None:
            headers["X-MAE-View"] = view
    else:
        headers["X-MAE-Dim"] = str(r.out.patches.shape[-1])
    return headers
