"""Shared test setup: offline W&B in a temporary folder, a per-session data cache, config helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sift_cli.train import CONF

REPO = Path(__file__).resolve().parents[1]
CORPUS = "\n\n".join(
    f"The {adj} function returns the {noun} of its argument when the {noun} is defined. "
    f"It raises an error for a {adj} value and keeps the {noun} otherwise."
    for adj in ("quick", "slow", "small", "large", "empty", "full", "first", "last", "open", "closed")
    for noun in ("length", "sum", "name", "path", "value", "key", "list", "string", "number", "file")
)


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path_factory.mktemp("wandb")),
        "WANDB_SILENT": "true",
        "SIFT_CACHE": str(tmp_path_factory.mktemp("cache")),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small English corpus: 100 paragraphs, enough for a tokenizer and a few batches."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def make_config(overrides: list[str]):
    """The composed config exactly as `sift-train OVERRIDES` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tiny_overrides(corpus_file: Path, *extra: str) -> list[str]:
    """A seconds-long BERT run on the test corpus, no W&B."""
    return [
        "data=text_files", f"data.paths=[{corpus_file}]", "data.seq_len=32", "data.vocab_size=200",
        "data.val_fraction=0.2", "trainer.batch_size=8", "trainer.max_steps=6", "trainer.max_time_s=null",
        "trainer.eval_every_steps=3", "trainer.eval_every_s=null", "trainer.eval_batch_size=16",
        # a schedule in steps: reproducible to the bit (in time, the rate depends on the machine's speed)
        "trainer.schedule_unit=steps", "trainer.warmup=2", "logger=none", *extra,
    ]


def sift_train(*args: str, cwd: Path = REPO, timeout: int = 300, start_method: Optional[str] = None,
               **env: str) -> subprocess.CompletedProcess:
    """Run the real console entry point, as a user types it, in a session of its own (so a signal it sends
    its process group, as a terminal or SLURM would, reaches only it), with `env` added to the environment;
    with `start_method`, under that multiprocessing start method (spawn as on macOS, forkserver as Python
    3.14's default on Linux)."""
    entry = ["-m", "sift_cli.train"] if start_method is None else [
        "-c", f"import multiprocessing; multiprocessing.set_start_method({start_method!r})\n"
              "from sift_cli.train import main; main()"]
    # not the W&B service an in-process test of this worker started (wandb exports its address): a run of its
    # own, as a user's, starts its own service
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**inherited, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
