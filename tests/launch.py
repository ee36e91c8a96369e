"""The tests' own mae-serve launcher: the real CLI, with its test seams set from the environment.

    MAE_TEST_FORWARD_SLEEP_S   every batch's forward pass sleeps this long first (work really is in flight)
    MAE_TEST_DECODE_SLEEP_S    every image decode sleeps this long first (a decode still running at exit)

Run as `python -m tests.launch` by app.harness.ServerProcess(module="tests.launch"). Never shipped.
"""

from __future__ import annotations

import os
import time

import torch

from app import cli, imaging, model_thread
from app.model_thread import Op, Result
from app.registry import ModelEntry
from model.masking import Masking


def slow_forward(delay: float) -> model_thread.Forward:
    def forward(entry: ModelEntry, op: Op, images: torch.Tensor, masking: Masking | None) -> list[Result]:
        time.sleep(delay)
        return model_thread.forward(entry, op, images, masking)

    return forward


if __name__ == "__main__":
    decode_sleep = float(os.environ.get("MAE_TEST_DECODE_SLEEP_S", "0"))
    if decode_sleep:  # decoding has no seam: this process is the test's own, so it patches the function itself
        real_decode = imaging.decode

        def slow_decode(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(decode_sleep)
            return real_decode(*args, **kwargs)

        imaging.decode = slow_decode  # type: ignore[assignment]
    cli.main(forward=slow_forward(float(os.environ.get("MAE_TEST_FORWARD_SLEEP_S", "0"))))
