"""The house's rules, checked (docs/ARCHITECTURE.md): which room may import which, no import circles, and a serving
core that runs a batch with no web framework loaded."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("app", "client", "model", "photoset", "weights")
WEB = ("fastapi", "starlette", "uvicorn")

# room -> what it must never import (prefixes of module names, ours or third-party)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "model": ("app", "client"),
    "app.serving": ("app.http", "app.v2", "app.openai", "app.raydata", "app.cli", "app.supervisor", *WEB),
    "app.raydata": ("app.http", "app.v2", "app.openai", "app.cli", "app.supervisor", *WEB),
    "client": ("app", "model", "photoset", "torch"),
    "photoset": ("app", "client"),
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(package: str) -> dict[str, set[str]]:
    """module -> every module it imports (ours and third-party, top-level and inside functions), from the source."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / package.replace(".", "/")).rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def violations(room: str, forbidden: tuple[str, ...], graph: dict[str, set[str]]) -> dict[str, list[str]]:
    found = {m: sorted(d for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))
             for m, deps in graph.items()}  # fmt: skip
    return {m: d for m, d in found.items() if d}


@pytest.mark.unit
@pytest.mark.parametrize("room", FORBIDDEN)
def test_rooms_import_only_what_they_may(room):
    assert violations(room, FORBIDDEN[room], imports(room)) == {}


@pytest.mark.unit
def test_the_rule_catches_a_planted_import(tmp_path):
    """The check above can fail: a serving module that imports the HTTP room, or fastapi, is named."""
    graph = {"app.serving.pipeline": {"app.http.errors", "app.http.errors.APIError"}, "app.serving.engine": {"fastapi"}}
    assert violations("app.serving", FORBIDDEN["app.serving"], graph) == {
        "app.serving.pipeline": ["app.http.errors", "app.http.errors.APIError"],
        "app.serving.engine": ["fastapi"],
    }


@pytest.mark.unit
@pytest.mark.parametrize("package", ["app", "client", "model"])
def test_no_import_circles(package):
    ours = {module_name(p) for p in (ROOT / package).rglob("*.py")}
    graph = {m: {d for d in deps if d in ours} for m, deps in imports(package).items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle


@pytest.mark.integration  # spawns processes
def test_serving_core_runs_a_batch_without_a_web_framework():
    """What the Ray path and any other front-end build on: load a model, decode an image, run it through the
    engine, with fastapi, starlette and uvicorn never imported."""
    code = """
import asyncio, io, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
from app.serving import model_thread, pipeline, service
from app.settings import Settings

async def main():
    s = Settings(weights="", warmup=False, max_wait_ms=1)
    svc = await service.start(s, model_thread.forward, ThreadPoolExecutor(2))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    entry = svc.model(None)
    mask = pipeline.MaskSpec(ratio=0.0, seed=0)
    done = await pipeline.each_image(pipeline.embed(svc, entry, b, mask, "squash", None) for b in [buf.getvalue()] * 2)
    await svc.engine.close(1.0)
    return done

done = asyncio.run(main())
assert len(done) == 2 and all(np.isfinite(d.out.cls).all() for d in done), done
web = sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette", "uvicorn"))
assert not web, web
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
