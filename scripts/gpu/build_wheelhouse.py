#!/usr/bin/env python3
"""Build .wheelhouse/: the wheels a lent GPU machine needs to run mae-serve and scripts/gpu/kit.py there.

    make wheelhouse            # or: .venv/bin/python scripts/gpu/build_wheelhouse.py

The device's python3 (3.12, x86-64) has torch, torchvision and numpy but none of the web stack, and no network.
This walks mae-serve's runtime requirements (markers evaluated for CPython 3.12 on Linux), pins each to the version
installed here (what `make test` ran against), leaves out torch, numpy and what only torch needs, and downloads
cp312 manylinux wheels of the rest with `pip download --no-deps`. The kit installs them with
`pip install --no-index --no-deps --target`. The folder is ignored by git and travels with `carry=[".wheelhouse"]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
PROJECT = "mae-serve"
# On the device image (scripts/gpu/kit.py checks): torch, torchvision and numpy stay the image's. What only torch
# requires is never reached, since the walk does not enter torch.
EXCLUDE = {"torch", "torchvision", "numpy", "triton"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The travelling tree (tracked files, about 14 MiB with the bundled weights) and the wheels share 64 MiB.
LIMIT_MIB = 48.0


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


def applies(marker: Marker | None, env: dict[str, str], extras: set[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**env, "extra": e}) for e in extras | {""})


def closure(python: str) -> dict[str, str]:
    """{canonical name: requirement to download}: a pinned version where it is installed here."""
    env = environment(python)
    todo: list[tuple[str, set[str]]] = [(PROJECT, set())]
    seen: dict[str, set[str]] = {}
    out: dict[str, str] = {}
    while todo:
        name, extras = todo.pop()
        key = canonical(name)
        if key in EXCLUDE or (key in seen and extras <= seen[key]):
            continue
        seen[key] = seen.get(key, set()) | extras
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            out[key] = name  # not installed here (needed on 3.12 only): pip picks a version
            continue
        if key != canonical(PROJECT):
            out[key] = f"{key}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if applies(req.marker, env, seen[key]):
                todo.append((req.name, set(req.extras)))
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / ".wheelhouse"), help="folder (default .wheelhouse/; emptied first)")
    p.add_argument("--python", default="3.12", help="the device's Python version (default 3.12)")
    args = p.parse_args(argv)
    try:
        md.distribution(PROJECT)
    except md.PackageNotFoundError:
        print(f"{PROJECT} is not installed in {sys.executable}: run `make wheelhouse` (it uses .venv)", file=sys.stderr)
        return 2
    reqs = closure(args.python)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    abi = "cp" + args.python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    cmd += ["--python-version", args.python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    print(f"downloading {len(reqs)} wheels for CPython {args.python} manylinux x86-64 into {out}", flush=True)
    r = subprocess.run([*cmd, *reqs.values()])
    if r.returncode != 0:
        return r.returncode
    wheels = sorted(out.glob("*.whl"))
    names = [canonical(w.name.split("-")[0]) for w in wheels]
    missing = sorted(set(reqs) - set(names))
    doubles = sorted({n for n in names if names.count(n) > 1})
    if missing or doubles:
        print(f"wheelhouse incomplete: missing {missing}, twice {doubles}", file=sys.stderr)
        return 1
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in reqs.values()))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {mib:.1f} MiB in {out} (limit {LIMIT_MIB:.0f} MiB: the tree travels beside them)")
    if mib > LIMIT_MIB:
        print(f"too large: over {LIMIT_MIB:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
