"""`python tests/preempt_run.py FLAGS` runs train.py's cli and sends this process SIGTERM while it fetches the batch
of step $SIGTERM_AT_STEP, on rank $SIGTERM_RANK only (default 0): the preemption tests' stand-in for a scheduler."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import train  # noqa: E402
from config import main_guard  # noqa: E402

AT, WHO = int(os.environ["SIGTERM_AT_STEP"]), int(os.environ.get("SIGTERM_RANK", "0"))
real_next_batch, calls = data.PretrainStream.next_batch, [0]


def next_batch(self):
    calls[0] += 1
    if calls[0] == AT and int(os.environ.get("RANK", "0")) == WHO:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now; the step goes on
    return real_next_batch(self)


data.PretrainStream.next_batch = next_batch
main_guard(train.cli)
