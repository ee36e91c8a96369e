"""tests.harness.ServerProcess, the server-process harness of the tests and benchmarks: stopping a server leaves
nothing of it running (a benchmark's later measurements shared the cores with LitServe workers that had outlived
their server)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.harness import ServerProcess

pytestmark = pytest.mark.integration  # spawns processes

# A "server" that starts a worker the way LitServe does (a child that does not die with its parent) and waits.
PARENT = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "time.sleep(120)\n"
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (or init) has yet to reap it


def test_stop_also_ends_what_the_server_started():
    proc = ServerProcess(command=[sys.executable, "-c", PARENT]).start()
    try:
        deadline = time.monotonic() + 20
        while len(proc.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        parent, child = proc.pids()[:2]
        assert alive(child)
        proc.stop(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(parent) and not alive(child), "the server's child outlived stop()"
    finally:
        proc.kill()
