"""Every knob of the service, from the environment (prefix MAE_) or the mae-serve command line."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "mae_demo.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAE_", extra="ignore")

    # --- where and what
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    weights: str = Field("", description="one path, or name=path,name2=path2; empty = the bundled demo model")
    device: str = Field("auto", description="auto (cuda if available) | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    warmup: bool = True
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch threads; 0 = from the CPUs this process may use (affinity, cgroup quota), a quarter "
        "(rounded down) left to decoding and encoding; 1 with the model on a GPU",
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile the transformer stacks at start (compiled on first use: warm-up covers the first "
        "shapes); reduce-overhead adds CUDA graphs on a GPU",
    )
    cpu_kernels: Literal["auto", "onednn", "onednn-packed", "stock"] = Field(
        "auto",
        description="fp32 linear layers on CPU: oneDNN (AVX-512 where the CPU has it), onednn-packed (the weights "
        "pre-reordered: a second copy in memory), stock PyTorch, or auto: oneDNN if a start-up timing of the model's "
        "widest layer finds it faster (BENCHMARKS.md)",
    )
    omp_wait: Literal["auto", "passive", "spin"] = Field(
        "auto",
        description="OpenMP's idle threads between parallel regions: passive (sleep at once), spin (libgomp's "
        "spinning), or auto: both timed once on this CPU at start (cached), spinning kept only where faster. "
        "OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment win",
    )

    workers: int = Field(
        1, ge=1, le=256, description="HTTP worker processes in front of one model process; 1 = one process does both"
    )

    # --- batching engine
    max_batch_size: int = Field(32, ge=1, le=1024)
    cpu_max_batch_size: int = Field(
        4,
        ge=1,
        le=1024,
        description="on a CPU, batches stop here: past a few images the activations leave the cache and each image "
        "costs more (BENCHMARKS.md)",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="how long a partial batch waits for images still being decoded; a lone request never waits",
    )
    max_queue: int = Field(256, ge=1, description="images waiting for the model; beyond this: 503 Retry-After")
    model_instances: int = Field(
        0,
        ge=0,
        le=64,
        description="batches computed side by side, each on its own model thread (Triton's instance count); on a "
        "CPU each gets the torch threads divided among them. 0 = auto: one on a GPU; on a CPU one, or one per torch "
        "thread, whichever a timing of the model at start (with images decoding beside it) finds faster (cached)",
    )
    io_threads: int = Field(4, ge=1, le=64, description="threads decoding and encoding images")

    # --- limits on input
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body cap, counted while reading")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height cap, checked before decoding")
    max_images_per_request: int = Field(16, ge=1)
    jpeg_draft: bool = Field(
        False,
        description="decode a large JPEG at a reduced DCT scale (1/2 to 1/8, never below the model's input) before "
        "resizing: faster, but not the reference preprocessing (BENCHMARKS.md gives the error)",
    )
    jpeg_decode: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="where JPEGs are decoded and resized: cpu (Pillow, the reference preprocessing) or cuda (nvJPEG "
        "through torchvision, resized on the GPU; needs the model on a GPU and torchvision; pixels close to Pillow's, "
        "not equal: BENCHMARKS.md)",
    )
    max_jpeg_scans: int = Field(
        32,
        ge=1,
        description="scans per JPEG, counted before decoding (a progressive decode walks the image once per scan); "
        "libjpeg's progressive default writes 10",
    )
    max_param_bytes: int = Field(
        64 * 1024, ge=256, description="size of one parameter value (form field or JSON value), checked before parsing"
    )

    # --- connections (a silent or slow client must not hold the server)
    limit_concurrency: int = Field(
        128, ge=1, description="requests served at once (probes and /metrics not counted); beyond: 503 Retry-After"
    )
    max_connections: int = Field(
        2048, ge=16, description="open connections; at most the open-file limit minus a reserve"
    )
    header_timeout_s: float = Field(10.0, gt=0, description="time for a request head to arrive; then 408")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="size of a request head (line + headers); then 431")
    body_timeout_s: float = Field(60.0, gt=0, description="time for a request body to arrive; then 408")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="HTTP/1.1 parser: httptools (C; auto, where installed) or h11 (pure Python)"
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop: uvloop (auto, where installed) or the standard library's asyncio"
    )

    # --- the Open Inference Protocol's gRPC front-end (app/v2/grpc.py); REST /v2 is always on the HTTP port
    grpc_port: int | None = Field(None, ge=0, le=65535, description="gRPC (v2 GRPCInferenceService) port; off if unset")
    grpc_max_message_bytes: int | None = Field(
        None, ge=1024, description="largest gRPC request message; unset = MAE_MAX_BODY_BYTES"
    )

    # --- remote image URLs in POST /v1/embeddings (app/openai/fetch.py): off unless hosts are listed
    url_fetch_hosts: str = Field(
        "",
        description="comma-separated hosts image URLs may name (exact, or *.example.com), and IP addresses or networks "
        "(10.0.0.0/8) that may be reached although loopback, link-local or private; empty = URLs refused",
    )
    url_fetch_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="size of one fetched image")
    url_fetch_timeout_s: float = Field(10.0, gt=0, description="time for one URL, redirects included")
    url_fetch_max_redirects: int = Field(3, ge=0, le=20, description="redirects followed per URL")

    # --- security and lifecycle
    api_keys: str = Field("", description="comma-separated bearer tokens (/v1, /v2 and gRPC); empty = no auth")
    metrics_require_key: bool = Field(False, description="with MAE_API_KEYS set, /metrics needs a key too")
    weights_sha256: str = Field(
        "", description="pin: one sha256 (one model) or name=sha256,...; a file that differs refuses to start"
    )
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")
    shutdown_timeout_s: float = Field(20.0, ge=0, description="on SIGTERM, how long in-flight requests may take")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503 overload answers")
    log_level: str = "info"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @cached_property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def weight_pins(self) -> dict[str | None, str]:
        """{model name: expected sha256}; the key None pins the only model."""
        out: dict[str | None, str] = {}
        for part in (p.strip() for p in self.weights_sha256.split(",") if p.strip()):
            name, sep, digest = part.rpartition("=")
            digest = digest.strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"bad MAE_WEIGHTS_SHA256 entry {part!r}: expected 64 hex digits")
            out[name.strip() if sep else None] = digest
        if None in out and len(out) > 1:
            raise ValueError("MAE_WEIGHTS_SHA256: name every pin when there are several")
        return out

    def weight_specs(self) -> list[tuple[str, str]]:
        """[(model name, path)]. A single unnamed path is named after its file."""
        spec = self.weights.strip()
        if not spec:
            return [("mae-demo", str(BUNDLED_WEIGHTS))]
        out: list[tuple[str, str]] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, path = part.partition("=")
            if not sep:
                name, path = Path(part).stem or "default", part
            name, path = name.strip(), path.strip()
            if not name or not path:
                raise ValueError(f"bad MAE_WEIGHTS entry {part!r}: expected name=path")
            if name in {n for n, _ in out}:
                raise ValueError(f"MAE_WEIGHTS names model {name!r} twice")
            out.append((name, path))
        return out
