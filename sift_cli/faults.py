"""Kill points for the tests of resume: the process kills itself (SIGKILL) where a test asks it to.

`SIFT_TEST_KILL=<point>:<step>` makes `kill_point(<point>, <step>)` end the process at once, as a
crash, an OOM kill or a lost node would, so tests reach every fragile moment without sleeping.
Points: `step` (after a training step), `checkpoint-files` (the checkpoint's files written, before
its manifest), `checkpoint-rename` (complete, before the rename), `metrics-line` (half a metrics row
written).

`SIFT_TEST_SIGNAL=<SIGNAME>:<step>` has another process send the signal after that training step to the
whole process group, as SLURM's preemption signal or a terminal's Ctrl-C reaches the run and its data workers;
`SIFT_TEST_SIGNAL=<SIGNAME>:<point>:<step>` at another point (`checks`, step 0: before the config is
checked; `data`: before the data is built; `evaluation`: as the evaluation at that step begins).
Start such a run in a session of its own (`start_new_session=True`): the group is then the run.
"""

from __future__ import annotations

import os
import signal


def armed(point: str, step: int) -> bool:
    """Whether a test asked for a kill at this point and step."""
    return os.environ.get("SIFT_TEST_KILL") == f"{point}:{step}"


def kill_point(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    name, _, at = os.environ.get("SIFT_TEST_SIGNAL", "").partition(":")
    at_point, _, at_step = at.rpartition(":")
    if name and (at_point or "step", at_step) == (point, str(step)):
        # sent by another process, as SLURM or a terminal sends it: a data worker obeys a SIGTERM from its parent
        # alone, so one sent from here would not test that the workers leave the signal to the main process
        sender = os.fork()
        if sender == 0:
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the sender is in the group too
            os.killpg(os.getpgrp(), signal.Signals[name])
            os._exit(0)
        os.waitpid(sender, 0)  # the signal has reached this process when its sender is gone
