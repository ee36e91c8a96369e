"""`mae-serve`: settings from the command line and MAE_* variables, then uvicorn (app/http/server.py) runs the app.

One process (MAE_WORKERS=1) serves HTTP and runs the model. With MAE_WORKERS=N > 1 this process becomes the model
process and supervises N HTTP workers on the same port (app/supervisor.py); each worker is this command again, told
by MAE_WORKER_FD which socket to serve.

On SIGTERM /readyz turns 503 at once, in-flight requests finish (up to MAE_SHUTDOWN_TIMEOUT_S; what is left then is
answered 503), and the process exits 0 within the budget plus http.server.DRAIN_MARGIN_S. A load failure exits 1 with
one line on stderr; a bad setting exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from app import supervisor
from app.serving.cpus import prepare_runtime
from app.settings import Settings
from app.supervisor import ENGINE_ADDRESS, WORKER_FD, WORKER_INDEX

if TYPE_CHECKING:  # imported in main(): the metrics must know first whether they are shared between processes
    from app.serving.model_thread import Forward

log = logging.getLogger("mae.serve")


def parse(argv: list[str] | None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="mae-serve",
        description="Serve a Masked Autoencoder over HTTP. Every "
        "option is also an environment variable MAE_<NAME>; see the README.",
    )
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--grpc-port", type=int, help="the Open Inference Protocol over gRPC on this port (off if unset)")
    ap.add_argument("--weights", help="a weights path, or name=path,name2=path2")
    ap.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--max-batch-size", type=int)
    ap.add_argument("--max-wait-ms", type=float)
    ap.add_argument("--workers", type=int, help="HTTP worker processes in front of one model process (1: one process)")
    ap.add_argument("--log-level")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
        settings.weight_specs()
        settings.weight_pins()
    except ValueError as e:
        print(f"mae-serve: bad setting: {e}".splitlines()[0], file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def main(argv: list[str] | None = None, forward: Forward | None = None) -> None:
    """Run mae-serve. `forward`: what runs a batch (tests/launch.py passes a slow one)."""
    settings = parse(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and Path("/dev/nvidiactl").exists())
    log.info("%s", prepare_runtime(settings.omp_wait, gpu=gpu))  # before anything imports torch
    if settings.workers > 1 and WORKER_FD not in os.environ:
        supervisor.prepare_metrics()  # before anything imports prometheus_client
        code = supervisor.run(settings, forward, argv or [])
    else:
        code = serve(settings, forward)
    # Exit now: the interpreter's own exit would join the worker threads, and a decode still running for a request
    # that was already answered 503 must not hold the process past its drain budget.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(settings: Settings, forward: Forward | None) -> int:
    """Serve HTTP in this process: the whole service, or (MAE_WORKER_FD) one worker of the supervisor's."""
    from app.http import server as http_server
    from app.http.main import create_app
    from app.http.readiness import Readiness
    from app.serving import model_thread

    before, open_files, hard = http_server.raise_open_file_limit()
    max_connections = http_server.connection_cap(settings.max_connections, open_files, settings.limit_concurrency)
    log.info("open files: soft limit %d -> %d (hard %d); at most %d connections", before, open_files, hard,
             max_connections)  # fmt: skip
    server: http_server.Server | None = None

    def stop(_: str) -> None:  # a load failure: the one line is printed on the way out, below
        if server is not None:
            server.should_exit = True

    fd = os.environ.get(WORKER_FD)
    if fd:
        _die_with_parent()
    app = create_app(
        settings,
        forward=forward or model_thread.forward,
        on_load_failure=stop,
        engine_address=os.environ.get(ENGINE_ADDRESS) if fd else None,
        serve_grpc=os.environ.get(WORKER_INDEX, "0") == "0",
    )
    state: Readiness = app.state.readiness
    config = http_server.uvicorn_config(app, settings, max_connections)
    server = http_server.Server(config, state, drain_s=settings.shutdown_timeout_s)
    # After a graceful shutdown uvicorn re-raises the signal it caught, under the handler that was there before
    # it started; with Python's defaults the process would then die by SIGTERM (143) or a KeyboardInterrupt
    # traceback. A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[socket.socket(fileno=int(fd))] if fd else None)
    if state.startup_error:
        print(f"mae-serve: {state.startup_error}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


def _die_with_parent() -> None:
    """A worker ends when its model process does, however that ends (Linux: PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the model process on this platform")


if __name__ == "__main__":
    main()
