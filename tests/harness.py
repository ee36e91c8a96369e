"""Start a real mae-serve process on a free loopback port and wait until it is ready.

One harness for the tests, the benchmarks and the smoke checks, so "start, wait for /readyz, stop" is written once.
The process's output goes to a file, never a pipe: a server that logs a lot must not block on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m <module>` (default: `app.cli`, what `mae-serve` runs) with MAE_* settings from `env`.

    args: its arguments; "{host}" and "{port}" in them are filled in (another server, e.g. a baseline, takes those).
    command: run this instead of `python -m <module> args` (e.g. an installed `mae-serve`).
    prefix: a command to run it under (e.g. `["prlimit", "--nofile=256:256"]`).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        module: str = "app.cli",
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        prefix: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | Path | None = None,
        split_stderr: bool = False,
        cwd: str | Path = REPO,
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.env = {"MAE_HOST": host, "MAE_PORT": str(self.port), "MAE_LOG_LEVEL": "warning", **(env or {})}
        filled = [a.format(host=host, port=self.port) for a in args]
        self.command = [*prefix, *(command or [sys.executable, "-m", module]), *filled]
        self.cwd = Path(cwd)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="mae-serve-", suffix=".log")[1])
        # split_stderr: stderr to its own file (`stderr()`), e.g. to check that a failure is one line there.
        self.err_path = self.log_path.with_suffix(".err") if split_stderr else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.listening_s = self.ready_s = float("nan")  # seconds from start to the port open, to /readyz 200

    # ------------------------------------------------------------------ life
    def start(self) -> ServerProcess:
        env = {**os.environ, **self.env}
        # The checkout's own packages first (cwd; then this repository's, for another checkout of app/ only).
        paths = [str(self.cwd), str(REPO), os.environ.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        with open(self.log_path, "wb") as log, open(self.err_path or os.devnull, "wb") as err:
            stderr = err if self.err_path else subprocess.STDOUT
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log, stderr=stderr)
        return self

    def wait_ready(self, timeout: float = 120.0, poll_s: float = 0.05) -> float:
        """Block until /readyz answers 200; returns the seconds since start (`ready_s`; the port opened at
        `listening_s`). Raises if the process exits first, or kills it after `timeout`."""
        end = self._t0 + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < end:
                if (rc := self.exit_code()) is not None:
                    raise RuntimeError(f"server exited with {rc} before it was ready:\n{self.tail()}")
                try:
                    status = client.get("/readyz").status_code
                    if self.listening_s != self.listening_s:  # nan: the first answer
                        self.listening_s = time.monotonic() - self._t0
                    if status == 200:
                        self.ready_s = time.monotonic() - self._t0
                        return self.ready_s
                except httpx.TransportError:
                    pass
                time.sleep(poll_s)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait; kill after `timeout`. Returns the exit status. Descendants the server left behind
        (LitServe's inference workers outlive their parent, and keep polling a queue) are killed after it."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            tree = self.pids()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            for pid in tree[1:]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        return self.proc.returncode

    # What a caller may need to drive a shutdown step by step (a subclass may run the server another way).
    def exit_code(self) -> int | None:
        """None while it runs."""
        assert self.proc is not None, "start() first"
        return self.proc.poll()

    def sigterm(self) -> None:
        assert self.proc is not None, "start() first"
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once it stopped by itself; None if it had to be killed after `timeout` seconds."""
        assert self.proc is not None, "start() first"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ looking at it
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stderr(self) -> str:
        assert self.err_path is not None, "ServerProcess(split_stderr=True) keeps stderr apart"
        return self.err_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def status_kib(self, field: str) -> int:
        """A `/proc/PID/status` field in KiB: VmHWM (peak resident memory), VmRSS, ..."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def pids(self) -> list[int]:
        """The server's processes: this one and its children (the HTTP workers of MAE_WORKERS > 1), recursively."""
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):  # the thread ended meanwhile
                    todo += [int(c) for c in task.read_text().split()]
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server (all its processes and threads) from /proc/PID/stat."""
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:  # exited meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in Prometheus text whose labels include `labels`; 0 if none."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        have = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if "=" in kv)
        if all(have.get(k, "").strip('"') == v for k, v in labels.items()):
            total += float(value)
    return total
