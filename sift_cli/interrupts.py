"""A Ctrl-C before training: noted by a signal handler, acted on between phases. Below both the entry point
(cli.py, train.py) and the loop (trainer.py), which both ask it; it imports nothing heavy, so the console
script can install it before it imports torch."""

from __future__ import annotations

import signal
import sys
import threading

BEFORE_ANY_RUN = " before any run began; nothing was written"
_interrupted = False  # a Ctrl-C before training, noted in case the KeyboardInterrupt raised for it is swallowed


def note(signum, frame) -> None:
    """A SIGINT handler that only notes the Ctrl-C (while importing: a KeyboardInterrupt raised inside torch's
    C++ module set-up aborts the process)."""
    global _interrupted
    _interrupted = True


def _interrupt(signum, frame):
    note(signum, frame)
    raise KeyboardInterrupt


def _quiet_noted_interrupt(report):
    def hook(unraisable):
        if not (_interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            report(unraisable)
    hook.quiets_noted_interrupts = True
    return hook


def catch_early_interrupts() -> None:
    """Ctrl-C before training (the checks, reading data, building the model, compiling) stops the run at once.
    Python raises KeyboardInterrupt wherever the main thread is, and there a finalizer or a library's broad
    `except` can swallow it, and the run would go on; so the handler also notes it, and check_interrupted()
    acts on the note between those phases. One swallowed by a finalizer or a fork hook is not reported with
    a traceback: the note stops the run with its one line."""
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        signal.signal(signal.SIGINT, _interrupt)
        if not getattr(sys.unraisablehook, "quiets_noted_interrupts", False):
            sys.unraisablehook = _quiet_noted_interrupt(sys.unraisablehook)


def noted() -> bool:
    return _interrupted


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def interrupted(what_is_kept: str) -> None:
    """A Ctrl-C outside training: one line saying what it leaves, and the exit code that stops a sweep."""
    print(f"sift-train: interrupted{what_is_kept}", file=sys.stderr)
    sys.exit(130)
