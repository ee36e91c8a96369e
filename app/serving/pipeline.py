"""One image's path through the service, whatever the protocol: decode -> mask -> engine -> a typed result.

`reconstruct` returns a `ReconstructAnswer`, `embed` an `EmbedAnswer`; the front-ends (app/http for /v1, app/v2,
app/openai, app/raydata) turn those into their own answers. Decoding runs in the I/O pool, the model in the engine.
An image that cannot be served raises a `ServingError` (app.serving.errors), so a request with several images can
answer each; the front-ends give it its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from app.serving import imaging, jpeg_gpu
from app.serving.errors import BadMask, NotCapable, ServingError
from app.serving.model_thread import Op, Result
from app.serving.registry import ModelEntry
from app.serving.service import Service
from app.settings import Settings
from client.vocabulary import ResizeMode
from model.family import ModelConfig
from model.masking import Masking, explicit_masking, random_masking_spec
from model.outputs import Embedding, Reconstruction

T = TypeVar("T")


@dataclass(frozen=True)
class MaskSpec:
    """Which patches to hide: exactly `indices` when given, else a random `ratio` drawn from `seed`."""

    ratio: float
    seed: int
    indices: list[int] | None = None

    def masking(self, num_patches: int, encoder_only: bool) -> Masking | None:
        """The official masking this names; None = every patch in raster order (embeddings at ratio 0)."""
        if self.indices is not None:
            try:
                return explicit_masking(self.indices, num_patches)
            except ValueError as e:
                raise BadMask(str(e)) from None
        if self.ratio == 0 and encoder_only:
            return None
        return random_masking_spec(num_patches, self.ratio, self.seed)

    @property
    def drawn_seed(self) -> int | None:
        """The seed that drew the mask, None for an explicit one."""
        return None if self.indices is not None else self.seed


# The answers carry every fact a front-end reports as a plain field, worked out here once: a front-end reads them
# without calling back into this module.
@dataclass(frozen=True)
class ReconstructAnswer:
    model: ModelEntry
    image: np.ndarray  # (H, W, 3) uint8: the model's input, the "original" view
    out: Reconstruction
    seed: int | None  # None for an explicit mask
    mask_indices: list[int]  # the masked patches, raster order
    mask_ratio: float  # the fraction of patches actually masked
    patch_size: int

    @classmethod
    def of(cls, entry: ModelEntry, image: np.ndarray, out: Reconstruction, seed: int | None) -> ReconstructAnswer:
        c = entry.config
        masked = np.flatnonzero(out.mask).tolist()
        return cls(entry, image, out, seed, masked, len(masked) / c.num_patches, c.patch_size)


@dataclass(frozen=True)
class EmbedAnswer:
    model: ModelEntry
    out: Embedding
    seed: int | None  # None when no random mask was drawn
    mask_ratio: float  # the fraction of patches not encoded

    @classmethod
    def of(cls, entry: ModelEntry, out: Embedding, seed: int | None) -> EmbedAnswer:
        return cls(entry, out, seed, 1 - out.patches.shape[0] / entry.config.num_patches)


async def reconstruct(
    service: Service, entry: ModelEntry, data: bytes, mask: MaskSpec, resize: ResizeMode, deadline: float | None
) -> ReconstructAnswer:
    _require_decoder(entry)
    image, (out,) = await _run(service, entry, ("reconstruct",), data, mask, resize, deadline)
    assert isinstance(out, Reconstruction)
    return ReconstructAnswer.of(entry, image, out, mask.drawn_seed)


async def embed(
    service: Service, entry: ModelEntry, data: bytes, mask: MaskSpec, resize: ResizeMode, deadline: float | None
) -> EmbedAnswer:
    _, (out,) = await _run(service, entry, ("embed",), data, mask, resize, deadline)
    assert isinstance(out, Embedding)
    return _embedded(entry, out, mask)


async def reconstruct_and_embed(
    service: Service, entry: ModelEntry, data: bytes, mask: MaskSpec, resize: ResizeMode, deadline: float | None
) -> tuple[ReconstructAnswer, EmbedAnswer]:
    """Both passes on one decode of the image, on the same mask (the v2 front-end, asked for both kinds of output)."""
    _require_decoder(entry)
    image, (rec, emb) = await _run(service, entry, ("reconstruct", "embed"), data, mask, resize, deadline)
    assert isinstance(rec, Reconstruction) and isinstance(emb, Embedding)
    return ReconstructAnswer.of(entry, image, rec, mask.drawn_seed), _embedded(entry, emb, mask)


def _require_decoder(entry: ModelEntry) -> None:
    if not entry.config.has_decoder:
        raise NotCapable(f"model {entry.name!r} has no pixel decoder: it can embed, not reconstruct", "no_decoder")


def require_cls(entry: ModelEntry) -> None:
    """pool=cls needs a CLS token: checked before any image is decoded."""
    if not entry.config.has_cls:
        raise NotCapable(f"model {entry.name!r} has no CLS token; use pool=mean", "no_cls_token")


def _embedded(entry: ModelEntry, out: Embedding, mask: MaskSpec) -> EmbedAnswer:
    drew = mask.indices is None and mask.ratio != 0
    return EmbedAnswer.of(entry, out, mask.seed if drew else None)


async def _run(
    service: Service,
    entry: ModelEntry,
    ops: tuple[Op, ...],
    data: bytes,
    mask: MaskSpec,
    resize: ResizeMode,
    deadline: float | None,
) -> tuple[np.ndarray, list[Result]]:
    """Decode once (in the I/O pool, started here), then the engine runs each op on it."""
    prepared = asyncio.get_running_loop().run_in_executor(
        service.io_pool, _prepare, data, entry.config, mask, ops, resize, service.settings
    )
    return await service.engine.run(entry, ops, prepared, deadline)


def _prepare(
    data: bytes, c: ModelConfig, mask: MaskSpec, ops: tuple[Op, ...], resize: ResizeMode, s: Settings
) -> tuple[np.ndarray, list[Masking | None]]:
    """In the I/O pool: the image decoded and resized to the model's input, and each op's masking (off the loop)."""
    maskings = [mask.masking(c.num_patches, encoder_only=op == "embed") for op in ops]
    return prepare_image(data, c.img_size, resize, s), maskings


def prepare_image(data: bytes, size: int, resize: ResizeMode, s: Settings) -> np.ndarray:
    """Encoded bytes -> the model's uint8 input (size, size, 3), as every front-end prepares an image (the HTTP
    ones here, app.raydata in its decode tasks); an ImageError when it cannot be."""
    if s.jpeg_decode == "cuda":  # MAE_JPEG_DECODE: nvJPEG and the resize on the GPU
        device = jpeg_gpu.decode_device(s.device)
        return jpeg_gpu.decode_preprocess(data, size, resize, device, s.max_image_pixels, s.max_jpeg_scans)
    draft = size if s.jpeg_draft else None  # MAE_JPEG_DRAFT: a reduced DCT scale, never below the model's size
    return imaging.load(data, size, resize, s.max_image_pixels, min_side=draft, max_jpeg_scans=s.max_jpeg_scans)


async def each_image(answers: Iterable[Awaitable[T]]) -> list[T | ServingError]:
    """Await one answer per image (`reconstruct(...)`, `embed(...)` for each), concurrently so they can share a
    batch; refusals stay per image."""
    results = await asyncio.gather(*answers, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, ServingError):
            raise r
    return results  # type: ignore[return-value]
