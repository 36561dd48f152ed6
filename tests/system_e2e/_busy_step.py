"""Imported by a test run (``--import``): model worker 1 spends ``BUSY_S`` seconds of pure
Python work inside its first training step, holding the GIL between switches,
as a long legitimate call does."""

import os
import time

from realhf.impl.model.interface import sft_interface

BUSY_S = 10.0
_original = sft_interface.SFTInterface.train_step
_done = []


def _busy_train_step(self, *args, **kwargs):
    out = _original(self, *args, **kwargs)
    if os.environ.get("REAL_WORKER_TYPE") == "model_worker" and os.environ.get("REAL_WORKER_INDEX") == "1" \
            and not _done:
        _done.append(True)
        end = time.monotonic() + BUSY_S
        n = 0
        while time.monotonic() < end:
            n += 1
    return out


sft_interface.SFTInterface.train_step = _busy_train_step
