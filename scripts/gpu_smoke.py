#!/usr/bin/env python3
"""GPU smoke test for mae-serve: reduced precision on the GPU must answer like float32.

Starts the server (`mae-serve`, a subprocess on a free port) twice, one after the other:

  reference:  MAE_DEVICE=<--ref-device, default: --device>  MAE_DTYPE=float32
  candidate:  MAE_DEVICE=<--device, default cuda>           MAE_DTYPE=<--dtype, default bfloat16>

waits for /readyz on each, sends the same images to POST /v1/reconstruct (format=json, fixed seed) and
POST /v1/embed (json), and checks the candidate's answers against the reference's:

  * embeddings: cosine similarity > --min-cosine (default 0.99) for every image;
  * reconstructions: PSNR between the two > --min-psnr dB (default 30), pixels scaled to [0, 1];
  * masks (when the answer has one): identical, since the seed fixes them.

Then, on the candidate: a concurrent burst (prints images/s and latency percentiles), and a SIGTERM during a
burst: every admitted request must complete and the process must exit 0.

    python scripts/gpu_smoke.py                                  # on a GPU host
    python scripts/gpu_smoke.py --device cpu --dtype float32     # dry run without a GPU
    python scripts/gpu_smoke.py --container mae-serve:0.1.0 --build   # the GPU image: build it, then the same
                                                                 # checks on its containers (docker stop drains)

With --device/--dtype equal to the reference, one server runs and its answers are compared with a second round
of the same requests (a determinism check). Exit status: 0 all checks passed, 1 a check failed, 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: its app/ (the one harness)
from tests.harness import ServerProcess  # noqa: E402

# mae-serve's JSON answers: reconstruct {"mask": [...], "images": {view: base64 PNG}, ...}; embed {"cls": [...],
# "mean": [...], "patches": [[...]], ...}. Other names are looked for too, so the script survives renames.
RECON_KEYS = ("reconstruction", "reconstructed", "recon", "image", "pixels", "output")
EMBED_KEYS = ("cls", "mean", "embedding", "embeddings", "features", "vector")
MASK_KEYS = ("mask",)


class SetupError(RuntimeError):
    """The smoke test could not run (server did not start, unexpected API shape): exit status 2."""


# --------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"reconstruction shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def synthetic_images(count: int, size: int = 224, seed: int = 0) -> list[tuple[str, bytes]]:
    """Deterministic test pictures (gradients, discs, stripes, noise) as PNG bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    out = []
    for i in range(count):
        img = np.stack([xx, yy, 1.0 - 0.5 * (xx + yy)], axis=-1)
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            img[disc] = rng.uniform(0.0, 1.0, size=3)
        freq = 4 + 3 * i
        img *= (0.75 + 0.25 * np.sin(2 * np.pi * freq * xx))[..., None]
        img += rng.normal(0.0, 0.03, size=img.shape)
        pixels = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        out.append((f"synthetic-{i}.png", buf.getvalue()))
    return out


def load_images(folder: Path) -> list[tuple[str, bytes]]:
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.suffix.lower() in exts]


# --------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------


def find_key(obj: Any, names: tuple[str, ...]) -> Any:
    """The value of the first of `names` found in a JSON answer (searched breadth-first, lists included)."""
    queue = [obj]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for name in names:
                if name in cur and cur[name] is not None:
                    return cur[name]
            queue.extend(cur.values())
        elif isinstance(cur, list) and cur and isinstance(cur[0], dict | list):
            queue.extend(cur)
    return None


def as_pixels(value: Any) -> np.ndarray:
    """An image from an answer: base64 (or data: URL) of an encoded image, or nested lists of numbers -> [0, 1]."""
    if isinstance(value, dict):
        inner = find_key(value, ("data", "base64", "png", "pixels", "values"))
        if inner is None:
            raise SetupError(f"cannot read an image from an object with keys {sorted(value)}")
        return as_pixels(inner)
    if isinstance(value, str):
        raw = value.split(",", 1)[1] if value.startswith("data:") else value
        with Image.open(io.BytesIO(base64.b64decode(raw))) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(value, dtype=np.float64)
    return arr / 255.0 if arr.size and arr.max() > 1.5 else arr


def as_vector(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        inner = find_key(value, ("values", "data", "vector"))
        if inner is None:
            raise SetupError(f"cannot read an embedding from an object with keys {sorted(value)}")
        value = inner
    return np.asarray(value, dtype=np.float64)


@dataclass
class Answer:
    recon: np.ndarray
    mask: np.ndarray | None
    embeddings: dict[str, np.ndarray]  # pooling ("cls", "mean", ...) -> vector


# --------------------------------------------------------------------------------------------------------------
# Requests: shaped from the server's OpenAPI document when it publishes one
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    path: str
    file_field: str = "image"
    json_body: bool = False  # base64 image in a JSON body instead of a multipart upload
    query: set[str] = field(default_factory=set)
    form: set[str] = field(default_factory=set)
    known: bool = False  # shape read from the OpenAPI document

    def supports(self, name: str) -> bool:
        return self.known and (name in self.query or name in self.form)

    def request(self, image: bytes, filename: str, fields: dict[str, Any]) -> dict[str, Any]:
        """httpx.request keyword arguments. Known shape: query parameters where the endpoint takes them, else form
        fields; fields it does not take are left out. Unknown shape: each field goes in both the query and the form
        (same value twice)."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if self.known:
            query = {k: v for k, v in fields.items() if k in self.query}
            form = {k: v for k, v in fields.items() if k in self.form and k not in self.query}
        else:
            query, form = dict(fields), dict(fields)
        if self.json_body:
            body = {self.file_field: base64.b64encode(image).decode(), **form}
            return {"params": query, "json": body}
        files = {self.file_field: (filename, image, "application/octet-stream")}
        return {"params": query, "data": {k: str(v) for k, v in form.items()}, "files": files}


def _resolve(doc: dict, schema: dict) -> dict:
    while isinstance(schema, dict) and "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node.get(part, {})
        schema = node
    return schema or {}


def endpoint_from_openapi(doc: dict | None, path: str) -> Endpoint:
    ep = Endpoint(path)
    op = ((doc or {}).get("paths", {}).get(path) or {}).get("post")
    if not op:
        return ep
    ep.query = {p["name"] for p in op.get("parameters", []) if p.get("in") == "query"}
    content = (op.get("requestBody") or {}).get("content", {})
    if "multipart/form-data" in content:
        props = _resolve(doc, content["multipart/form-data"].get("schema", {})).get("properties", {})
        for name, prop in props.items():
            prop = _resolve(doc, prop)
            variants = [prop, *prop.get("anyOf", []), *prop.get("oneOf", [])]
            variants += [_resolve(doc, v.get("items", {})) for v in variants if v.get("type") == "array"]
            binary = any(v.get("format") == "binary" or "contentMediaType" in v for v in variants)
            if binary:
                ep.file_field = name
            else:
                ep.form.add(name)
    elif "application/json" in content:
        props = _resolve(doc, content["application/json"].get("schema", {})).get("properties", {})
        ep.json_body = True
        image_names = [n for n in props if n in ("image", "image_b64", "image_base64", "data", "b64")]
        ep.file_field = image_names[0] if image_names else "image"
        ep.form = set(props) - {ep.file_field}
    ep.known = True
    return ep


# --------------------------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------------------------


def server_command(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    exe = shutil.which("mae-serve")
    if exe:
        return [exe]
    # Not on PATH (e.g. run with a venv's python without activating it): the console script's target.
    return [sys.executable, "-m", "app.cli"]


class Server(ServerProcess):
    """mae-serve as a process on this host (app.harness), on a free loopback port."""

    def __init__(self, label: str, device: str, dtype: str, args: argparse.Namespace, logdir: Path) -> None:
        self.label, self.device, self.dtype, self.args = label, device, dtype, args
        env = {
            "MAE_DEVICE": device,
            "MAE_DTYPE": dtype,
            "MAE_SHUTDOWN_TIMEOUT_S": str(args.shutdown_timeout),
            "MAE_API_KEYS": "",  # no auth for the smoke test
            "MAE_LOG_LEVEL": "info",
        }
        if args.weights:
            env["MAE_WEIGHTS"] = args.weights
        super().__init__(env, command=server_command(args.server_cmd), log_path=logdir / f"server-{label}.log")
        self.base_url = self.url

    def start(self) -> Server:
        print(
            f"[{self.label}] starting {shlex.join(self.command)} (MAE_DEVICE={self.device} MAE_DTYPE={self.dtype}) "
            f"on port {self.port}, log: {self.log_path}",
            flush=True,
        )
        super().start()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return self.tail(lines)
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float, poll_s: float = 0.5) -> float:
        try:
            return super().wait_ready(timeout, poll_s)
        except RuntimeError as e:
            raise SetupError(f"[{self.label}] {e}") from None

    def terminate(self) -> int | None:
        """SIGTERM and wait for the drain; returns the exit status (None: had to be killed)."""
        if self.proc is None:
            return None
        if self.exit_code() is not None:
            return self.exit_code()
        self.sigterm()
        return self.wait_exit(self.args.shutdown_timeout + 15)


# The hardening docker-compose.yml gives the service (tests/test_deploy.py checks that the two agree).
CONTAINER_HARDENING = [
    "--read-only",
    "--tmpfs",
    "/tmp:size=1g,mode=1777",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
    "--init",
]


class ContainerServer(Server):
    """The server as a container of --container IMAGE, run the way docker-compose.yml runs it, published on a
    loopback port; a GPU device gets `--gpus all`. SIGTERM is `docker stop` (it waits for the drain)."""

    def __init__(self, label: str, device: str, dtype: str, args: argparse.Namespace, logdir: Path) -> None:
        super().__init__(label, device, dtype, args, logdir)
        self.name = f"mae-smoke-{label}-{os.getpid()}"
        self.started = False
        self.stopper: subprocess.Popen | None = None

    def docker_run(self) -> list[str]:
        a = self.args
        cmd = [*shlex.split(a.docker), "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000"]
        cmd += [*CONTAINER_HARDENING, "--stop-timeout", str(a.shutdown_timeout + 10)]
        if self.device.startswith("cuda"):
            cmd += ["--gpus", "all"]
        env = {"MAE_DEVICE": self.device, "MAE_DTYPE": self.dtype, "MAE_SHUTDOWN_TIMEOUT_S": str(a.shutdown_timeout)}
        if a.weights:  # a file on this host: its folder is mounted read-only at /weights
            host = Path(a.weights).resolve()
            cmd += ["-v", f"{host.parent}:/weights:ro"]
            env["MAE_WEIGHTS"] = f"/weights/{host.name}"
        for k, v in env.items():
            cmd += ["-e", f"{k}={v}"]
        return [*cmd, a.container]

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*shlex.split(self.args.docker), *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> ContainerServer:
        cmd = self.docker_run()
        print(f"[{self.label}] starting {shlex.join(cmd)}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SetupError(f"[{self.label}] docker run failed ({r.returncode}): {r.stderr.strip()}")
        self.started = True
        self._t0 = time.monotonic()
        return self

    def exit_code(self) -> int | None:
        r = self.docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", self.name)
        if r.returncode != 0:
            raise SetupError(f"[{self.label}] container {self.name} is gone: {r.stderr.strip()}")
        running, code = r.stdout.split()
        return None if running == "true" else int(code)

    def sigterm(self) -> None:
        self.stopper = subprocess.Popen(
            [*shlex.split(self.args.docker), "stop", "-t", str(self.args.shutdown_timeout + 10), self.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_exit(self, timeout: float) -> int | None:
        try:
            r = self.docker("wait", self.name, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.docker("kill", self.name)
            return None
        if self.stopper is not None:
            self.stopper.wait(timeout=30)
        code = int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
        return None if code == 137 else code  # 137: docker stop's SIGKILL after its timeout

    def log_tail(self, lines: int = 40) -> str:
        r = self.docker("logs", "--tail", str(lines), self.name) if self.started else None
        if r is not None and r.returncode == 0:
            return (r.stdout + r.stderr).strip()
        return "(no log)"

    def terminate(self) -> int | None:
        if not self.started:
            return None
        try:
            rc = self.exit_code()
            if rc is None:
                self.sigterm()
                rc = self.wait_exit(self.args.shutdown_timeout + 15)
        except SetupError:
            rc = None
        r = self.docker("logs", self.name)  # kept for the failure report; then the container goes
        self.log_path.write_text(r.stdout + r.stderr)
        self.docker("rm", "-f", self.name)
        self.started = False
        return rc


def build_image(args: argparse.Namespace) -> None:
    """--build: the image from this repository's Dockerfile (default BASE: the CUDA runtime image)."""
    cmd = [*shlex.split(args.docker), "build", "-t", args.container]
    for arg in args.build_arg:
        cmd += ["--build-arg", arg]
    cmd.append(str(Path(__file__).resolve().parents[1]))
    print(f"building: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    if subprocess.run(cmd).returncode != 0:
        raise SetupError("docker build failed")
    print(f"built {args.container} in {time.monotonic() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}", flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def fetch_openapi(client: httpx.Client) -> dict | None:
    try:
        r = client.get("/openapi.json")
        return r.json() if r.status_code == 200 else None
    except (httpx.TransportError, ValueError):
        return None


def describe(r: httpx.Response) -> str:
    return f"HTTP {r.status_code}: {r.text[:500]}"


def query_answers(
    server: Server, images: list[tuple[str, bytes]], args: argparse.Namespace
) -> tuple[list[Answer], Endpoint, Endpoint]:
    with httpx.Client(base_url=server.base_url, timeout=args.request_timeout) as client:
        doc = fetch_openapi(client)
        recon_ep = endpoint_from_openapi(doc, "/v1/reconstruct")
        embed_ep = endpoint_from_openapi(doc, "/v1/embed")
        answers = []
        for i, (name, data) in enumerate(images):
            seed = args.seed + i
            r = client.post(
                recon_ep.path, **recon_ep.request(data, name, {"format": "json", "seed": seed, "model": args.model})
            )
            if r.status_code != 200:
                raise SetupError(f"[{server.label}] POST {recon_ep.path} ({name}) -> {describe(r)}")
            try:
                body = r.json()
            except ValueError as e:
                raise SetupError(
                    f"[{server.label}] /v1/reconstruct did not answer JSON "
                    f"(content-type {r.headers.get('content-type')})"
                ) from e
            recon = find_key(body, RECON_KEYS)
            if recon is None:
                raise SetupError(
                    f"[{server.label}] no reconstruction ({'/'.join(RECON_KEYS)}) in the answer's "
                    f"keys {list(body) if isinstance(body, dict) else type(body).__name__}"
                )
            mask = find_key(body, MASK_KEYS)
            r = client.post(embed_ep.path, **embed_ep.request(data, name, {"format": "json", "model": args.model}))
            if r.status_code != 200:
                raise SetupError(f"[{server.label}] POST {embed_ep.path} ({name}) -> {describe(r)}")
            body = r.json()
            top = body if isinstance(body, dict) else {}
            embeddings = {k: as_vector(top[k]) for k in ("cls", "mean") if top.get(k) is not None}
            if not embeddings:
                emb = find_key(body, EMBED_KEYS)
                if emb is None:
                    raise SetupError(f"[{server.label}] no embedding ({'/'.join(EMBED_KEYS)}) in the answer")
                embeddings = {"embedding": as_vector(emb)}
            answers.append(Answer(as_pixels(recon), None if mask is None else np.asarray(mask), embeddings))
        return answers, recon_ep, embed_ep


def compare(ref: list[Answer], cand: list[Answer], names: list[str], args: argparse.Namespace, rep: Report) -> None:
    print(
        f"\nAgreement with the float32 reference (embedding cosine > {args.min_cosine}, "
        f"reconstruction PSNR > {args.min_psnr} dB):",
        flush=True,
    )
    for name, a, b in zip(names, ref, cand, strict=True):
        if a.mask is not None and b.mask is not None:
            rep.check(
                a.mask.shape == b.mask.shape and bool(np.array_equal(a.mask, b.mask)),
                f"{name}: same mask for the same seed",
            )
        for pool, vec in a.embeddings.items():
            try:
                cos = cosine(vec, b.embeddings[pool])
                rep.check(cos > args.min_cosine, f"{name}: embedding ({pool}) cosine {cos:.6f} (dim {vec.size})")
            except (KeyError, ValueError) as e:
                rep.check(False, f"{name}: embedding ({pool}): {e!r}")
        try:
            p = psnr(a.recon, b.recon)
            rep.check(p > args.min_psnr, f"{name}: reconstruction PSNR {p:.2f} dB (shape {a.recon.shape})")
        except ValueError as e:
            rep.check(False, f"{name}: {e}")


@dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    key: str  # "200", "503", "not admitted ...", "dropped in flight ..."
    latency: float


async def burst(
    server: Server,
    ep: Endpoint,
    images: list[tuple[str, bytes]],
    fields: dict,
    n: int,
    concurrency: int,
    timeout: float,
) -> tuple[float, list[Outcome]]:
    """n requests, `concurrency` at a time: (images/s answered 200, one Outcome per request)."""
    outcomes: list[Outcome] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=timeout, limits=limits) as client:

        async def one(i: int) -> None:
            name, data = images[i % len(images)]
            async with sem:
                t0 = time.monotonic()
                try:
                    r = await client.post(ep.path, **ep.request(data, name, fields))
                    key = str(r.status_code)
                except httpx.ConnectError:
                    key = "not admitted (connect refused)"
                except httpx.TransportError as e:
                    key = f"dropped in flight ({type(e).__name__})"
                outcomes.append(Outcome(t0, key, time.monotonic() - t0))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    ok = sum(o.key == "200" for o in outcomes)
    return (ok / elapsed if elapsed > 0 else 0.0), outcomes


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o.key] = out.get(o.key, 0) + 1
    return out


async def burst_with_sigterm(
    server: Server,
    ep: Endpoint,
    images: list[tuple[str, bytes]],
    fields: dict,
    n: int,
    concurrency: int,
    timeout: float,
) -> tuple[float, list[Outcome]]:
    """A burst with SIGTERM sent 0.3 s in: (when SIGTERM was sent, the outcomes)."""
    task = asyncio.create_task(burst(server, ep, images, fields, n, concurrency, timeout))
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    server.sigterm()
    _, outcomes = await task
    return sent, outcomes


def burst_requests(
    recon_ep: Endpoint, embed_ep: Endpoint, args: argparse.Namespace
) -> list[tuple[str, Endpoint, dict[str, Any]]]:
    """What the bursts send: small answers (the CLS embedding only; the reconstruction as one PNG), so the numbers
    measure the model and the batching rather than JSON encoding of every view and every patch token."""
    embed = {"format": "json", "model": args.model, "pool": "cls" if embed_ep.supports("pool") else None}
    recon = {"format": "png", "seed": args.seed, "model": args.model}
    return [("embed", embed_ep, embed), ("reconstruct", recon_ep, recon)]


def throughput(
    server: Server,
    recon_ep: Endpoint,
    embed_ep: Endpoint,
    images: list[tuple[str, bytes]],
    args: argparse.Namespace,
    rep: Report,
) -> None:
    print(f"\nThroughput on [{server.label}] ({args.burst} requests, {args.concurrency} concurrent):", flush=True)
    for what, ep, fields in burst_requests(recon_ep, embed_ep, args):
        rate, outcomes = asyncio.run(
            burst(server, ep, images, fields, args.burst, args.concurrency, args.request_timeout)
        )
        ms = [o.latency * 1000 for o in outcomes if o.key == "200"]
        print(
            f"  {what:<12} {rate:8.1f} images/s   latency p50 {percentile(ms, 50):7.1f} ms  "
            f"p95 {percentile(ms, 95):7.1f} ms  max {max(ms, default=math.nan):7.1f} ms",
            flush=True,
        )
        tally = counts(outcomes)
        rep.check(tally.get("200", 0) == args.burst, f"{what} burst: all {args.burst} requests answered 200 {tally}")


def drain_check(
    server: Server, embed_ep: Endpoint, images: list[tuple[str, bytes]], args: argparse.Namespace, rep: Report
) -> None:
    """SIGTERM mid-burst. Requests sent 50 ms or more before the signal were admitted: each must get an answer
    (200, or 503 if the server sheds it); later ones may also be refused at connect or cut (the listener closes)."""
    print(f"\nGraceful shutdown on [{server.label}]: SIGTERM during a burst of {args.burst} embeds:", flush=True)
    sent, outcomes = asyncio.run(
        burst_with_sigterm(
            server,
            embed_ep,
            images,
            burst_requests(embed_ep, embed_ep, args)[0][2],
            args.burst,
            args.concurrency,
            args.request_timeout,
        )
    )
    rc = server.wait_exit(args.shutdown_timeout + 15)
    admitted = [o for o in outcomes if o.started < sent - 0.05]
    in_flight = [o for o in admitted if o.started + o.latency > sent]
    print(
        f"  before SIGTERM: {counts(admitted)}  (of these, still in flight at SIGTERM: {len(in_flight)}); "
        f"after: {counts([o for o in outcomes if o.started >= sent - 0.05])}",
        flush=True,
    )
    bad = counts([o for o in admitted if o.key not in ("200", "503")])
    rep.check(not bad, f"every request admitted before SIGTERM got an answer {bad or ''}".rstrip())
    if not in_flight:
        print(
            "  note: no request was in flight at SIGTERM (the server was faster than the burst); "
            "raise --burst to exercise the drain",
            flush=True,
        )
    rep.check(rc == 0, f"exit status 0 after the drain (got {rc})")


def models_check(server: Server, rep: Report) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        r = client.get("/v1/models")
        rep.check(r.status_code == 200, f"[{server.label}] GET /v1/models -> {r.status_code}")
        r = client.get("/metrics")
        rep.check(r.status_code == 200 and "# TYPE" in r.text, f"[{server.label}] GET /metrics is Prometheus text")


def run(args: argparse.Namespace) -> int:
    images = synthetic_images(args.images_count, seed=args.seed)
    if args.images:
        images += load_images(Path(args.images))
    names = [n for n, _ in images]
    same = args.device == args.ref_device and args.dtype == "float32"
    rep = Report()
    print(
        f"mae-serve smoke: candidate {args.device}/{args.dtype} vs reference {args.ref_device}/float32, "
        f"{len(images)} images, seeds from {args.seed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mae-smoke-") as tmp:
        logdir = Path(args.log_dir) if args.log_dir else Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        servers: list[Server] = []
        server_class = ContainerServer if args.container else Server
        try:
            if args.container and args.build:
                build_image(args)
            ref_server = server_class("reference", args.ref_device, "float32", args, logdir)
            servers.append(ref_server)
            ref_server.start()
            print(f"[reference] ready in {ref_server.wait_ready(args.ready_timeout):.1f} s", flush=True)
            ref, recon_ep, embed_ep = query_answers(ref_server, images, args)
            print(
                f"[reference] request shape: reconstruct file field '{recon_ep.file_field}'"
                f"{' (from /openapi.json)' if recon_ep.known else ' (guessed: no /openapi.json)'}",
                flush=True,
            )
            if same:
                cand_server = ref_server
                cand, _, _ = query_answers(cand_server, images, args)
            else:
                rc = ref_server.terminate()
                rep.check(rc == 0, f"[reference] exit status 0 on SIGTERM (got {rc})")
                cand_server = server_class("candidate", args.device, args.dtype, args, logdir)
                servers.append(cand_server)
                cand_server.start()
                print(f"[candidate] ready in {cand_server.wait_ready(args.ready_timeout):.1f} s", flush=True)
                cand, recon_ep, embed_ep = query_answers(cand_server, images, args)
            compare(ref, cand, names, args, rep)
            print("", flush=True)
            models_check(cand_server, rep)
            if args.burst > 0:
                throughput(cand_server, recon_ep, embed_ep, images, args, rep)
                if not args.no_drain:
                    drain_check(cand_server, embed_ep, images, args, rep)
        except SetupError as e:
            print(f"\nERROR: {e}", file=sys.stderr, flush=True)
            return 2
        finally:
            for s in servers:
                s.terminate()
        if rep.failures:
            print(f"\nFAILED: {len(rep.failures)} check(s):", flush=True)
            for f in rep.failures:
                print(f"  - {f}", flush=True)
            for s in servers:
                print(f"\n[{s.label}] log tail:\n{s.log_tail(20)}", flush=True)
            return 1
    print("\nOK: all checks passed", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit status: 0 pass, 1 fail, 2 error.")
    p.add_argument("--device", default="cuda", help="candidate MAE_DEVICE (default cuda)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="candidate MAE_DTYPE (default bfloat16)",
    )
    p.add_argument("--ref-device", default=None, help="reference (float32) MAE_DEVICE (default: --device)")
    p.add_argument("--weights", default=None, help="MAE_WEIGHTS for both servers (default: the bundled demo)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's default)")
    p.add_argument("--images", default=None, help="a folder of extra test images")
    p.add_argument("--images-count", type=int, default=4, help="synthetic test images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="first mask seed (default 0)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="embedding cosine threshold (default 0.99)")
    p.add_argument("--min-psnr", type=float, default=30.0, help="reconstruction PSNR threshold, dB (default 30)")
    p.add_argument(
        "--burst",
        type=int,
        default=None,
        help="requests per throughput burst (default 256 on a GPU, 32 on CPU; 0 skips)",
    )
    p.add_argument("--concurrency", type=int, default=None, help="concurrent requests (default 64 GPU, 8 CPU)")
    p.add_argument("--no-drain", action="store_true", help="skip the SIGTERM-during-burst check")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz (default 600)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--shutdown-timeout", type=int, default=20, help="MAE_SHUTDOWN_TIMEOUT_S (default 20)")
    p.add_argument("--server-cmd", default=None, help="command that starts the server (default: mae-serve)")
    p.add_argument(
        "--container",
        default=None,
        metavar="IMAGE",
        help="run the servers as containers of IMAGE (docker run, hardened like docker-compose.yml; --gpus all "
        "for a cuda device) instead of mae-serve processes",
    )
    p.add_argument("--build", action="store_true", help="with --container: docker build IMAGE from this repository")
    p.add_argument("--build-arg", action="append", default=[], help="with --build: a build argument (repeatable)")
    p.add_argument("--docker", default="docker", help="the docker command (default: docker)")
    p.add_argument("--log-dir", default=None, help="keep the server logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    args.ref_device = args.ref_device or args.device
    if (args.build or args.build_arg) and not args.container:
        p.error("--build and --build-arg need --container IMAGE")
    gpu = args.device.startswith("cuda")
    if args.burst is None:
        args.burst = 256 if gpu else 32
    if args.concurrency is None:
        args.concurrency = 64 if gpu else 8
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
