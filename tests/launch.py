"""The tests' own mae-serve launcher: the real CLI, with test seams set from the environment.

    MAE_TEST_FORWARD_SLEEP_S   every forward pass sleeps this long first (work really is in flight)
    MAE_TEST_DECODE_SLEEP_S    every image decode sleeps this long first (a decode still running at exit)

Run as `python -m tests.launch` by app.harness.ServerProcess(module="tests.launch"). Never shipped.
"""

from __future__ import annotations

import os
import time

from app import engine, imaging, main

_forward_sleep = float(os.environ.get("MAE_TEST_FORWARD_SLEEP_S", "0"))
_decode_sleep = float(os.environ.get("MAE_TEST_DECODE_SLEEP_S", "0"))

if _forward_sleep:
    _real_forward = engine.Engine._forward

    def _slow_forward(*args, **kwargs):
        time.sleep(_forward_sleep)
        return _real_forward(*args, **kwargs)

    engine.Engine._forward = staticmethod(_slow_forward)

if _decode_sleep:
    _real_decode = imaging.decode

    def _slow_decode(*args, **kwargs):
        time.sleep(_decode_sleep)
        return _real_decode(*args, **kwargs)

    imaging.decode = _slow_decode

if __name__ == "__main__":
    main.cli()
