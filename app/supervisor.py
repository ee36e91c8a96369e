"""MAE_WORKERS > 1: this process is the model process; it supervises the HTTP worker processes.

- It binds the listening socket once; every worker serves that same socket (inherited, MAE_WORKER_FD), so the
  kernel hands each new connection to one of them.
- It loads the models, warms up and runs the one LocalEngine and model thread; serving.remote.EngineServer answers the
  workers on an ipc:// ZeroMQ socket. Workers start at once (they import while the models load, and answer
  /healthz meanwhile) and report ready once the model process has answered them; a worker that starts while the
  model process already serves takes no connection before it is ready.
- Metrics are shared (prometheus_client's multiprocess mode): any worker's /metrics shows every process's counts.
- MAE_GRPC_PORT: worker 0 serves gRPC (one port has one listener), through the same model process.
- A worker that dies is started again. SIGTERM (or SIGINT): every worker drains (as a single process does: /readyz
  503, in-flight requests finish within MAE_SHUTDOWN_TIMEOUT_S), then the engine stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from app.settings import Settings

if TYPE_CHECKING:
    from app.serving.model_thread import Forward

log = logging.getLogger("mae.supervisor")
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
WORKER_FD = "MAE_WORKER_FD"  # set for a worker: it is an HTTP worker serving this listening socket
ENGINE_ADDRESS = "MAE_ENGINE_ADDRESS"  # set for a worker: where the model process answers
WORKER_INDEX = "MAE_WORKER_INDEX"  # set for a worker: 0..N-1 (kept by a replacement); worker 0 also serves gRPC


def prepare_metrics() -> None:
    """Shared metrics for every process of this server: set before any of them imports prometheus_client."""
    if METRICS_DIR not in os.environ:
        os.environ[METRICS_DIR] = tempfile.mkdtemp(prefix="mae-metrics-")


def run(settings: Settings, forward: Forward | None, argv: list[str]) -> int:
    sock = socket.create_server((settings.host, settings.port), backlog=2048)
    sock.set_inheritable(True)
    try:
        if settings.loop != "asyncio":
            try:
                import uvloop

                return uvloop.run(_supervise(settings, forward, sock, argv))
            except ImportError:
                pass
        return asyncio.run(_supervise(settings, forward, sock, argv))
    finally:
        sock.close()
        shutil.rmtree(os.environ.get(METRICS_DIR, ""), ignore_errors=True)


async def _supervise(settings: Settings, forward: Forward | None, sock: socket.socket, argv: list[str]) -> int:
    import torch
    from prometheus_client import multiprocess

    from app.serving import model_thread, remote
    from app.serving import service as svc
    from app.serving.cpus import configure_torch_threads
    from app.serving.registry import ModelLoadError

    configure_torch_threads(settings.torch_threads, on_gpu=settings.device != "cpu" and torch.cuda.is_available())
    tmp = tempfile.mkdtemp(prefix="mae-engine-")
    address = f"ipc://{tmp}/engine"
    env = {**os.environ, WORKER_FD: str(sock.fileno()), ENGINE_ADDRESS: address}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "app.cli", *argv], env={**env, WORKER_INDEX: str(index)},
                                pass_fds=(sock.fileno(),))  # fmt: skip

    workers = [spawn(i) for i in range(settings.workers)]
    log.info("model process %d: %d HTTP workers on %s:%d (pids %s)", os.getpid(), settings.workers, settings.host,
             sock.getsockname()[1], ", ".join(str(w.pid) for w in workers))  # fmt: skip
    code = 0
    service = server = None
    try:
        load = loop.create_task(svc.start(settings, forward or model_thread.forward, ThreadPoolExecutor(1)))
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():  # a signal while loading: stop without serving
            load.cancel()
            return 0
        try:
            service = load.result()
        except (ModelLoadError, ValueError) as e:
            print(f"mae-serve: {e}".splitlines()[0], file=sys.stderr)
            return 1
        server = remote.EngineServer(address, service.registry, service.engine)
        server.start()
        while not stop.is_set():  # keep the workers up
            for i, w in enumerate(workers):
                if w.poll() is not None:
                    log.warning("worker %d exited with %s; starting another", w.pid, w.returncode)
                    multiprocess.mark_process_dead(w.pid)
                    workers[i] = spawn(i)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        code = await _stop(workers, settings.shutdown_timeout_s) or code
        for w in workers:
            multiprocess.mark_process_dead(w.pid)
        if server is not None:
            await server.close()
        if service is not None:
            await service.engine.close(0)
        shutil.rmtree(tmp, ignore_errors=True)
    return code


async def _stop(workers: list[subprocess.Popen[bytes]], drain_s: float) -> int:
    """SIGTERM every worker; wait for their drain (budget + margin); kill what is left. 0 if all exited 0."""
    from app.http.server import DRAIN_MARGIN_S

    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + drain_s + DRAIN_MARGIN_S + 1.0
    while any(w.poll() is None for w in workers) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for w in workers:
        if w.poll() is None:
            log.warning("worker %d did not drain in time: killed", w.pid)
            w.kill()
            w.wait()
    return 0 if all(w.returncode == 0 for w in workers) else 1
