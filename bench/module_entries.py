"""How often one request enters each module of the project on its way through (issue #23's measure).

    python -m bench.module_entries [--weights W] [--cpu-kernels stock] [-v]

(run from a checkout's root; older layouts work too)

`sys.setprofile` on every thread during one warm `POST /v1/reconstruct?seed=3` (in-process TestClient). An entry
is a frame's first run (a call, or a coroutine's first resumption) whose nearest caller among the project's modules
is another module: torch's and asyncio's frames in between are looked through, so nn.Module.__call__ is not an entry
but a property read across modules is. Work handed on continues the module that handed it: a job given to a thread
pool (`submit`, `run_in_executor`) or a coroutine made a task (`create_task`, `ensure_future`, `gather`) has that
module as its caller, and a loop started before the request (the engine's batcher, woken by `submit`) is not
entered by it. -v lists every entry, caller -> callee (function).
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import os
import sys
import threading
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path.cwd().resolve()
OURS = ("app", "model", "client")
_GENERATOR_FLAGS = 0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
_names: dict[str, str | None] = {}


def module_of(code: CodeType) -> str | None:
    f = code.co_filename
    if f not in _names:
        try:
            rel = Path(f).resolve().relative_to(ROOT)
            ours = rel.parts[0] in OURS
            _names[f] = ".".join(rel.with_suffix("").parts).removesuffix(".__init__") if ours else None
        except ValueError:
            _names[f] = None
    return _names[f]


def _nearest_ours(frame: FrameType | None) -> str | None:
    while frame is not None and module_of(frame.f_code) is None:
        frame = frame.f_back
    return module_of(frame.f_code) if frame is not None else None


def _handed_code(frame: FrameType) -> CodeType | None:
    """The code a thread-pool submit or a task creation is handing on, if this frame is one of those."""
    code = frame.f_code
    name, loc = code.co_name, frame.f_locals
    if name == "submit" and code.co_filename.endswith(("concurrent/futures/thread.py", "concurrent/futures/_base.py")):
        fn = loc.get("fn")
    elif name in ("create_task", "ensure_future", "_ensure_future"):
        fn = loc.get("coro") or loc.get("coro_or_future")
    else:
        return None
    while isinstance(fn, functools.partial):
        fn = fn.func
    inner = getattr(fn, "cr_code", None) or getattr(fn, "__code__", None)
    return inner if isinstance(inner, CodeType) else None


class Counter:
    def __init__(self) -> None:
        self.active = False
        self.counts: collections.Counter[str] = collections.Counter()
        self.paths: list[str] = []
        self.seen: set[FrameType] = set()  # the frames themselves, not their ids (an id is reused once freed)
        self.handed: dict[CodeType, str | None] = {}  # code handed to a pool or a task -> the module handing it

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.active or event != "call":
            return
        m = module_of(frame.f_code)
        if m is None:
            if (code := _handed_code(frame)) is not None:
                self.handed[code] = _nearest_ours(frame.f_back)
            return
        back = frame.f_back
        while back is not None and module_of(back.f_code) is None:
            back = back.f_back
        caller = module_of(back.f_code) if back is not None else None
        if frame.f_code.co_flags & _GENERATOR_FLAGS:  # a coroutine: its first resumption only
            if frame in self.seen:
                return
            self.seen.add(frame)
        if caller is None:
            if frame.f_code in self.handed:
                caller = self.handed[frame.f_code]
            elif frame.f_code.co_flags & _GENERATOR_FLAGS:  # resumed, never handed on: a loop begun before
                return
        if caller != m:
            self.counts[m] += 1
            self.paths.append(f"{caller} -> {m} ({frame.f_code.co_name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mae_demo.safetensors"))
    ap.add_argument("-v", action="store_true")
    ap.add_argument(
        "--cpu-kernels",
        default="stock",
        help="MAE_CPU_KERNELS (default stock, so the count does not hang on the start-up timing: where oneDNN is "
        "chosen, each linear layer's forward is app.serving.cpu_kernels', one entry per layer)",
    )
    args = ap.parse_args()
    sys.path.insert(0, os.getcwd())
    from fastapi.testclient import TestClient

    if (ROOT / "app" / "http" / "main.py").exists():
        from app.http.main import create_app
    else:  # the layout before issue #23
        from app.main import create_app  # type: ignore[no-redef]
    from app.settings import Settings

    counter = Counter()
    threading.setprofile(counter)  # every thread started from here on (the app's loop, the model thread, the I/O pool)
    sys.setprofile(counter)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    post = {"params": {"seed": 3}, "content": buf.getvalue(), "headers": {"Content-Type": "image/png"}}
    settings = Settings(weights=args.weights, warmup=True, cpu_kernels=args.cpu_kernels)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        for _ in range(2):  # warm: lazy imports and first-call paths are not the request's path
            assert c.post("/v1/reconstruct", **post).status_code == 200
        counter.active = True
        r = c.post("/v1/reconstruct", **post)
        counter.active = False
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    counts = counter.counts
    repeated = sum(1 for n in counts.values() if n > 1)
    print(f"modules entered: {len(counts)}, entries: {sum(counts.values())}, entered more than once: {repeated}")
    for m, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        print(f"  {n:3d}  {m}")
    if args.v:
        print("\n".join(counter.paths))


if __name__ == "__main__":
    main()
