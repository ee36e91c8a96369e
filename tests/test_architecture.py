"""The house's rules, checked: model/ never imports app/, and app/ has no import circle (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of this repository it imports (app.x, model.y), from the source."""
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in (ROOT / package).rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("app", "model"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] in ("app", "model")}
        graph[name] = deps - {name}
    return graph


def test_model_never_imports_app():
    offenders = {m: sorted(d for d in deps if d.startswith("app")) for m, deps in imports("model").items()}
    assert not {m: d for m, d in offenders.items() if d}, offenders


@pytest.mark.parametrize("package", ["app", "model"])
def test_no_import_circles(package):
    graph = {m: {d for d in deps if d.startswith(package)} for m, deps in imports(package).items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle
