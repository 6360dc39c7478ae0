"""Training and validation data for every task; one cache folder for all of them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Optional, Union

from sift_cli.config import ConfigError
from sift_cli.data.order import KnownAnswer

MAX_AUTO_WORKERS = 4  # enough to keep a GPU fed; more mostly costs memory


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where every dataset's cache lives: data.cache_dir, else $SIFT_CACHE, else ~/.cache/sift-train."""
    root = Path(cache_dir or os.environ.get("SIFT_CACHE") or Path.home() / ".cache" / "sift-train").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_workers(num_workers: Union[int, str]) -> int:
    """data.num_workers: a count, or auto = as many as this process may run on, at most MAX_AUTO_WORKERS."""
    if num_workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(MAX_AUTO_WORKERS, cpus)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} is not allowed; use auto or a whole number >= 0")
    return num_workers


def worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start, for them and for what they share with the main process (the trainer's
    gate): the process's start method (spawn on macOS, forkserver from Python 3.14 on Linux, or the one the user
    set), except a launcher's own (the joblib launcher's loky, whose pickler cannot send multiprocessing's
    shared memory to a worker), in which case the platform's first."""
    context = multiprocessing.get_context()
    if context.get_start_method() in multiprocessing.get_all_start_methods():
        return context
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


def worker_signals(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C and preemption signals to the main process, which stops it.

    SLURM and a terminal signal the whole process group, and a worker ended by the signal makes torch
    raise in the main process before it can checkpoint. So SIGINT, SIGUSR1 and SIGUSR2 are ignored, and
    SIGTERM ends the worker only when the main process sends it (torch's fallback for a stuck worker,
    multiprocessing's at exit); torch's own handler ends it whoever sends it."""
    for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit it

    def from_main_only():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=from_main_only, daemon=True).start()


def check_known_answer(duplicate_fraction: float, duplicate_pool: int, noise_fraction: float) -> None:
    """The known-answer keys of every data choice, each checked and named."""
    for key, value in (("data.duplicate_fraction", duplicate_fraction), ("data.noise_fraction", noise_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1) (0 leaves the training set as it is)")
    if isinstance(duplicate_pool, bool) or not isinstance(duplicate_pool, int) or duplicate_pool < 1:
        raise ConfigError(f"data.duplicate_pool={duplicate_pool} must be a whole number >= 1 (the samples copied)")


def make_known_answer(num_train: int, duplicate_fraction: float, duplicate_pool: int, noise_fraction: float,
                 seed: int, samples: str = "samples") -> KnownAnswer:
    """order.KnownAnswer for the data.* keys, checked; `samples` names them in a message (images, sequences)."""
    check_known_answer(duplicate_fraction, duplicate_pool, noise_fraction)
    try:
        return KnownAnswer(num_train, duplicate_fraction, duplicate_pool, noise_fraction, seed=seed)
    except ValueError:
        raise ConfigError(f"data.duplicate_fraction={duplicate_fraction} and data.noise_fraction={noise_fraction} "
                          f"leave no room for data.duplicate_pool={duplicate_pool} among {num_train:,} training "
                          f"{samples}; lower them") from None
