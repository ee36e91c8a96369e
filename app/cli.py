"""`mae-serve`: settings from the command line and MAE_* variables, then uvicorn (hardened: app/server.py) runs the app.

On SIGTERM /readyz turns 503 at once, in-flight requests finish (up to MAE_SHUTDOWN_TIMEOUT_S; what is left then is
answered 503), and the process exits 0 within the budget plus DRAIN_MARGIN_S. A load failure exits 1 with one line
on stderr; a bad setting exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from app import model_thread
from app import server as http_server
from app.main import create_app
from app.model_thread import Forward
from app.service import Readiness
from app.settings import Settings

log = logging.getLogger("mae.serve")


def main(argv: list[str] | None = None, forward: Forward = model_thread.forward) -> None:
    """Run mae-serve. `forward`: what runs a batch (tests/launch.py passes a slow one)."""
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
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    before, open_files, hard = http_server.raise_open_file_limit()
    max_connections = http_server.connection_cap(settings.max_connections, open_files, settings.limit_concurrency)
    log.info("open files: soft limit %d -> %d (hard %d); at most %d connections", before, open_files, hard,
             max_connections)  # fmt: skip
    server: http_server.Server | None = None

    def stop(_: str) -> None:  # a load failure: the one line is printed on the way out, below
        if server is not None:
            server.should_exit = True

    app = create_app(settings, forward=forward, on_load_failure=stop)
    state: Readiness = app.state.mae
    config = http_server.uvicorn_config(app, settings, max_connections)
    server = http_server.Server(config, state, drain_s=settings.shutdown_timeout_s)
    # After a graceful shutdown uvicorn re-raises the signal it caught, under the handler that was there before
    # it started; with Python's defaults the process would then die by SIGTERM (143) or a KeyboardInterrupt
    # traceback. A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    code = 0
    if state.startup_error:
        print(f"mae-serve: {state.startup_error}".splitlines()[0], file=sys.stderr)
        code = 1
    # Exit now: the interpreter's own exit would join the worker threads, and a decode still running for a request
    # that was already answered 503 must not hold the process past its drain budget.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
