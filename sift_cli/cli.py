"""`sift-train`'s console script, and what a Ctrl-C before training does: stop the run with one line and
exit code 130 (which stops a sweep too). The script takes charge of Ctrl-C before it imports the trainer
(torch, Hydra: seconds in which a user often presses it): one pressed then ends the run once the import is
done, with the same line as one pressed later, not an import traceback."""

from __future__ import annotations

import signal

from sift_cli import interrupts


def main() -> None:
    signal.signal(signal.SIGINT, interrupts.note)  # while importing, only noted
    from sift_cli.train import main as train

    if interrupts.noted():
        interrupts.interrupted(interrupts.BEFORE_ANY_RUN)
    train()
