"""The tests' own mae-serve launcher: the real CLI, with its test seams set from the environment.

    MAE_TEST_FORWARD_SLEEP_S   every batch's forward pass sleeps this long first (work really is in flight)
    MAE_TEST_DECODE_SLEEP_S    every image decode sleeps this long first (a decode still running at exit)

Run as `python -m tests.launch` by tests.harness.ServerProcess(module="tests.launch"). Never shipped. Nothing here
imports the service's modules before app.cli.main runs: with MAE_WORKERS > 1 the metrics must be set up first.
"""

from __future__ import annotations

import os
import time
from typing import Any

from app import cli


def slow_forward(delay: float) -> Any:
    def forward(entry: Any, op: Any, images: Any, masking: Any) -> Any:
        from app.serving import model_thread

        time.sleep(delay)
        return model_thread.forward(entry, op, images, masking)

    return forward


if __name__ == "__main__":
    decode_sleep = float(os.environ.get("MAE_TEST_DECODE_SLEEP_S", "0"))
    if decode_sleep:  # decoding has no seam: this process is the test's own, so it patches the function itself
        from app.serving import imaging

        real_decode = imaging.decode

        def slow_decode(*args: Any, **kwargs: Any) -> Any:
            time.sleep(decode_sleep)
            return real_decode(*args, **kwargs)

        imaging.decode = slow_decode  # type: ignore[assignment]
    cli.main(forward=slow_forward(float(os.environ.get("MAE_TEST_FORWARD_SLEEP_S", "0"))))
