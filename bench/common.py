"""What every benchmark shares: paths, photos, machine facts, pausing background jobs, tables and JSON."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
WEIGHTS = BENCH / ".weights"
VITB_DIR = WEIGHTS / "vit-mae-base-random"  # HF save_pretrained directory (bench/make_weights.py)
DEMO_RANDOM = WEIGHTS / "mae_demo_random.safetensors"  # stand-in while weights/mae_demo.safetensors is trained
NULL = WEIGHTS / "null.safetensors"  # 224 px, 16 wide, 1 deep: compute ~0, what the host path costs is all there is
SMALL = WEIGHTS / "small.safetensors"  # 224 px, 192 wide, 4 deep (decoder 128 x 2): a small ViT
BUNDLED = REPO / "weights" / "mae_demo.safetensors"
PHOTOS = Path(os.environ.get("MAE_BENCH_PHOTOS", "/work/shared/datasets/photos/val"))
PYTHON = sys.executable


def photos(n: int = 6) -> list[tuple[str, bytes]]:
    """The first n photos (sorted by name) as (name, JPEG/PNG bytes)."""
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise SystemExit(f"no photos in {PHOTOS} (set MAE_BENCH_PHOTOS)")
    return [(p.name, p.read_bytes()) for p in files[:n]]


def bundled_or_random_demo() -> tuple[Path, str]:
    """(path, label): the trained bundled model if present, else a random-init model of the same config."""
    if BUNDLED.exists():
        return BUNDLED, "bundled (weights/mae_demo.safetensors)"
    if not DEMO_RANDOM.exists():
        raise SystemExit(f"{DEMO_RANDOM} missing: run `python -m bench.make_weights` first")
    return DEMO_RANDOM, "random-init mae_vit_demo_patch16 (bundled weights not trained yet)"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    rev = "unknown"
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git": rev,
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------- background jobs
TRAINING = r"model\.train|pretrain_demo"  # pgrep -f pattern of the background training job(s) to pause


def background_pids(pattern: str = TRAINING) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    me = os.getpid()
    return [int(p) for p in out if int(p) != me]


@contextlib.contextmanager
def paused(pattern: str | None, max_s: float = 540.0) -> Iterator[list[int]]:
    """SIGSTOP the processes matching `pattern` (pgrep -f) for the block; SIGCONT them afterwards, always.

    A watcher thread keeps them stopped (re-sending SIGSTOP every 50 ms, in case something else resumes them) and
    stops matching processes that start during the block (a restarted training job). A
    detached watchdog (`sleep max_s; kill -CONT <pids>`) resumes them even if this process is killed, so a job is
    never left stopped for more than max_s seconds.
    """
    if not pattern:
        yield []
        return
    stopped: list[int] = []
    pidfile = Path(tempfile.mkstemp(prefix="mae-bench-paused-")[1])
    lock = threading.Lock()
    done = threading.Event()

    def stop_new() -> None:
        with lock:
            new = [p for p in background_pids(pattern) if p not in stopped]
            for p in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
                    stopped.append(p)
            if new:
                pidfile.write_text(" ".join(map(str, stopped)))
                print(f"[bench] paused {pattern!r}: pids {new}", file=sys.stderr)

    def watch() -> None:
        # Re-stop the known pids often: another helper may SIGCONT the job on its own schedule (one here did,
        # every 2 s); a new matching process (a restarted job) is looked for once a second.
        tick = 0
        while not done.wait(0.05):
            tick += 1
            if tick % 20 == 0:
                stop_new()
            with lock:
                for p in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGSTOP)

    watchdog = subprocess.Popen(
        ["sh", "-c", f'sleep {int(max_s)}; kill -CONT $(cat "{pidfile}") 2>/dev/null; rm -f "{pidfile}"'],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # turn SIGTERM into SystemExit: finally runs
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        stop_new()
        watcher.start()
        time.sleep(0.5)  # let the cores go quiet
        yield stopped
    finally:
        done.set()
        with contextlib.suppress(RuntimeError):
            watcher.join(5)
        with lock:
            for p in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)  # the shell and its sleep (its own session, see Popen)
        watchdog.wait()
        pidfile.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, old)
        if stopped:
            print(f"[bench] resumed {stopped}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- numbers
def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_seconds(repeats: int, fn: Callable[..., object], *args: object) -> float:
    """Median wall time of `repeats` calls of `fn(*args)`, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return median(times)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    return out


def system_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (every core; idle and iowait excluded)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]], title: str = "") -> str:
    """rows -> a Markdown table; cols = [(key, header, format)]."""

    def fmt(v: Any, f: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float) and v != v:
            return "-"
        return format(v, f) if f else str(v)

    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---:" if f else "---" for _, _, f in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    text = "\n".join(([f"**{title}**", ""] if title else []) + [head, sep, *body])
    return text


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print(f"[bench] wrote {path.relative_to(REPO)}", file=sys.stderr)
    return path


def checkout(rev: str, into: Path, paths: Sequence[str] = ("app",)) -> Path:
    """`paths` of git revision `rev` extracted into `into`, by `git archive` (no change to the repository or its
    worktree): a server of that revision runs from there (ServerProcess's cwd comes first on its path)."""
    import io
    import tarfile

    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, *paths], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into
