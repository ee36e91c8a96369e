"""The offline photo set: rebuilt from Debian packages (and ../shared) by rules, checked against a manifest.

    python -m photoset.build build     # apt-get download + dpkg -x each package, prepare, verify -> data/photos/
    python -m photoset.build verify    # check the files already in data/photos/ against data/MANIFEST.json

`data/sources.json` says which files of which package versions are photographs, their licence, and which
*sources* (whole packages) are held out for cross-source validation. Each photo is decoded, converted to RGB,
downscaled to at most `max_side` pixels on its long side (Lanczos) and written as JPEG; its sha256 must equal the
one in `data/MANIFEST.json`. Layout: `data/photos/{train,val_in,val_cross}/<source>/<name>.jpg`, so the folder
above a file names its source (what `mae-evaluate` groups its per-source table and `--rows-per-source` by).

No root-wide install: packages are downloaded as .deb files with `apt-get download` (no root needed) and unpacked
with `dpkg -x` into a cache folder. `--write-manifest` rewrites the manifest from what was built (after editing
sources.json); without it, any difference is an error.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from photoset.qt_rcc import read_rcc

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "data" / "sources.json"
MANIFEST = REPO / "data" / "MANIFEST.json"
OUT = REPO / "data" / "photos"
CACHE = REPO / "data" / ".cache"
SHARED = REPO.parent / "shared"  # a worktree's ../shared; pass --shared elsewhere
SPLITS = ("train", "val_in", "val_cross")


class PhotosetError(RuntimeError):
    """The set could not be rebuilt as the manifest says."""


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------------- packages
class AptStore:
    """Debian packages unpacked under `cache/<package>_<version>/` (apt-get download + dpkg -x, no root)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def tree(self, package: str, version: str) -> Path:
        dest = self.cache / f"{package}_{version.replace(':', '%3a')}"
        if (dest / ".unpacked").exists():
            return dest
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        # apt names the file with the epoch as "%3a" (1:0.9 -> 1%3a0.9)
        pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
        found = sorted(debs.glob(pattern))
        if not found:
            r = subprocess.run(
                ["apt-get", "download", f"{package}={version}"], cwd=debs, capture_output=True, text=True
            )
            found = sorted(debs.glob(pattern))
            if r.returncode or not found:
                raise PhotosetError(
                    f"apt-get download {package}={version} failed: {r.stderr.strip() or r.stdout.strip()}\n"
                    "  (run `apt-get update` first; if Debian no longer carries this version, pick the new one in "
                    "data/sources.json and rebuild with --write-manifest)"
                )
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(found[0]), str(dest)], check=True)
        (dest / ".unpacked").touch()
        return dest


class DirStore:
    """Packages already unpacked under `root/<package>/` (tests, or a mirror of the trees)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tree(self, package: str, version: str) -> Path:
        dest = self.root / package
        if not dest.is_dir():
            raise PhotosetError(f"{package}: no folder {dest}")
        return dest


# ---------------------------------------------------------------------------------------------------- planning
@dataclass
class Planned:
    """One photo to produce: where it goes, where it comes from, and how to get its original bytes."""

    file: str  # relative to the output folder: <split>/<source>/<name>.jpg
    split: str
    source: str
    package: str
    version: str
    path: str  # inside the package ("bundle.rcc!member" for a file inside a Qt resource bundle)
    licence: str
    read: Callable[[], bytes]
    copy_as_is: bool = False  # the shared set is already prepared: copy its bytes
    expected_sha256: str | None = None  # known beforehand (the shared set's manifest)


def _match(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _split(source: str, name: str, rules: dict[str, Any], val_in: list[str]) -> str:
    if source in rules["cross_source"]:
        return "val_cross"
    return "val_in" if name in val_in else "train"


def _shared_source(label: str) -> tuple[str, str]:
    """'Debian mate-backgrounds 1.26.0' -> ('mate-backgrounds', '1.26.0'); library sample data by library name."""
    words = label.split()
    if words[0] == "Debian":
        return words[1], (words[2] if len(words) > 2 else "")
    return words[0], ""


def _plan_shared(src: dict[str, Any], rules: dict[str, Any], shared: Path) -> Iterator[Planned]:
    root = shared / src["shared_dir"]
    manifest = root / "MANIFEST.json"
    if not manifest.exists():
        raise PhotosetError(f"shared set not found: {manifest} (pass --shared)")
    for e in json.loads(manifest.read_text()):
        source, version = _shared_source(e["source"])
        name = PurePosixPath(e["file"])
        split = _split(source, e["file"], rules, src.get("val_in", []))
        path = root / e["file"]
        yield Planned(
            file=f"{split}/{source}/{name.name}",
            split=split,
            source=source,
            package=f"shared:{src['shared_dir']}",
            version=version,
            path=e["file"],
            licence=e["licence"],
            read=path.read_bytes,
            copy_as_is=True,
            expected_sha256=e["sha256"],
        )


def _plan_package(src: dict[str, Any], rules: dict[str, Any], tree: Path) -> Iterator[Planned]:
    source, val_in = src["source"], src.get("val_in", [])

    def planned(name: str, path: str, read: Callable[[], bytes]) -> Planned:
        split = _split(source, name, rules, val_in)
        return Planned(
            f"{split}/{source}/{name}.jpg", split, source, src["package"], src["version"], path, src["licence"], read
        )

    for pattern in src.get("files", []):
        hits = sorted(tree.glob(pattern))
        if not hits:
            raise PhotosetError(f"{source}: nothing matches {pattern} in {src['package']} {src['version']}")
        for p in hits:
            yield planned(p.stem, str(p.relative_to(tree)), p.read_bytes)
    for bundle in src.get("rcc", []):
        members = read_rcc(tree / bundle["bundle"])
        chosen = [
            m
            for m in sorted(members)
            if _match(m, bundle["include"])
            and not _match(m, bundle.get("exclude", []))
            and len(members[m]) >= src.get("min_bytes", 0)
        ]
        if not chosen:
            raise PhotosetError(f"{source}: nothing matches {bundle['include']} in {bundle['bundle']}")
        for m in chosen:
            parts = PurePosixPath(m).parts
            activity = parts[parts.index("activities") + 1] if "activities" in parts else Path(bundle["bundle"]).stem
            yield planned(f"{activity}-{PurePosixPath(m).stem}", f"{bundle['bundle']}!{m}", _constant(members[m]))


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def plan(rules: dict[str, Any], store: AptStore | DirStore, shared: Path) -> list[Planned]:
    """Every photo the rules select, in a stable order; file names must be unique."""
    out: list[Planned] = []
    for src in rules["sources"]:
        if "shared_dir" in src:
            out.extend(_plan_shared(src, rules, shared))
        else:
            out.extend(_plan_package(src, rules, store.tree(src["package"], src["version"])))
    dup = [f for f, n in Counter(p.file for p in out).items() if n > 1]
    if dup:
        raise PhotosetError(f"two photos would be written to the same file: {', '.join(sorted(dup))}")
    return sorted(out, key=lambda p: p.file)


# ---------------------------------------------------------------------------------------------------- preparing
def prepare(raw: bytes, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """Original image bytes -> (JPEG bytes, (width, height)): RGB, long side <= max_side (Lanczos)."""
    with Image.open(io.BytesIO(raw)) as f:
        im = f.convert("RGB")
        if max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS
            )
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)
        return buf.getvalue(), im.size


def _image_size(b: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(b)) as im:
        return im.size


def build(
    rules: dict[str, Any],
    manifest: list[dict[str, Any]] | None,
    out: Path,
    store: AptStore | DirStore,
    shared: Path,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Write every planned photo under `out` and return the manifest entries of what was written.

    With `manifest` given, each file must match its entry (same file name, sha256 and origin) and every entry
    must be produced; otherwise PhotosetError lists what differs (nothing is left half-written: a file is
    written only after it matched).
    """
    prep = rules["prepare"]
    expected = {e["file"]: e for e in manifest} if manifest is not None else None
    entries, problems = [], []
    for p in plan(rules, store, shared):
        raw = p.read()
        if p.copy_as_is:
            data, size = raw, _image_size(raw)
            if sha256_bytes(raw) != p.expected_sha256:
                problems.append(f"{p.file}: the shared copy's sha256 differs from the shared set's manifest")
                continue
        else:
            data, size = prepare(raw, prep["max_side"], prep["quality"])
        entry = {
            "file": p.file,
            "split": p.split,
            "source": p.source,
            "package": p.package,
            "version": p.version,
            "path": p.path,
            "licence": p.licence,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "size": list(size),
            "source_sha256": sha256_bytes(raw),
        }
        if expected is not None:
            want = expected.pop(p.file, None)
            if want is None:
                problems.append(f"{p.file}: not in the manifest (new in sources.json? rebuild with --write-manifest)")
                continue
            keys = ("sha256", "source_sha256", "package", "version", "path", "split")
            diff = [k for k in keys if want[k] != entry[k]]
            if diff:
                hint = (
                    " (same original, different encoding: another Pillow/libjpeg version?)"
                    if diff == ["sha256"]
                    else ""
                )
                problems.append(f"{p.file}: {', '.join(diff)} differ from the manifest{hint}")
                continue
        dest = out / p.file
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        entries.append(entry)
    if expected:
        problems += [f"{f}: in the manifest but not produced by the rules" for f in sorted(expected)]
    if problems:
        raise PhotosetError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    log(summary(entries))
    return entries


def verify(out: Path, manifest: list[dict[str, Any]]) -> list[str]:
    """Problems with the files under `out` (missing, or another sha256); empty when all match."""
    problems = []
    for e in manifest:
        path = out / e["file"]
        if not path.exists():
            problems.append(f"{e['file']}: missing")
        elif sha256_bytes(path.read_bytes()) != e["sha256"]:
            problems.append(f"{e['file']}: sha256 differs")
    return problems


def format_manifest(entries: list[dict[str, Any]]) -> str:
    """JSON, one photo per line (reviewable diffs)."""
    return "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n"


def summary(entries: list[dict[str, Any]]) -> str:
    """Counts per source and split, as a markdown table."""
    by = Counter((e["source"], e["split"]) for e in entries)
    sources = sorted({s for s, _ in by})
    lines = ["| source | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for s in sources:
        lines.append(f"| {s} | " + " | ".join(str(by[(s, sp)]) for sp in SPLITS) + " |")
    total = Counter(e["split"] for e in entries)
    lines.append("| **all** | " + " | ".join(f"**{total[sp]}**" for sp in SPLITS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "verify"])
    ap.add_argument("--sources", type=Path, default=SOURCES)
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--cache", type=Path, default=CACHE, help="where .deb files are downloaded and unpacked")
    ap.add_argument("--packages-dir", type=Path, default=None, help="use packages unpacked here (<dir>/<package>/)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (holds datasets/photos)")
    ap.add_argument("--write-manifest", action="store_true", help="rewrite the manifest from what the rules give")
    args = ap.parse_args(argv)

    if args.command == "verify":
        problems = verify(args.out, json.loads(args.manifest.read_text()))
        if problems:
            raise SystemExit(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
        print(f"all {len(json.loads(args.manifest.read_text()))} photos match {args.manifest}")
        return
    rules = json.loads(args.sources.read_text())
    store = DirStore(args.packages_dir) if args.packages_dir else AptStore(args.cache)
    manifest = None if args.write_manifest else json.loads(args.manifest.read_text())
    try:
        entries = build(rules, manifest, args.out, store, args.shared)
    except PhotosetError as e:
        raise SystemExit(f"error: {e}") from None
    if args.write_manifest:
        args.manifest.write_text(format_manifest(entries))
        print(f"wrote {args.manifest} ({len(entries)} photos)")
    else:
        print(f"all {len(entries)} photos built under {args.out} and match {args.manifest}")


if __name__ == "__main__":
    main()
