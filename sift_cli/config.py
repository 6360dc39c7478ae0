"""Structured configs (the schema Hydra checks types against) and the value checks.

The YAML files under conf/ hold the values; these dataclasses hold the types, so a value has one
home. `model` and `data` stay free-form: their keys are the constructor arguments of whatever
`_target_` names, and the target's signature is their schema.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CRITERIA = ("loss", "entropy", "random")
PRECISIONS = ("auto", "bf16", "fp32")
BATCH_MODES = ("scored", "updated")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PROGRESS = ("auto", "true", "false")


class ConfigError(ValueError):
    """A bad value from the user: printed as one line, exit code 2, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message, to quote inside a one-line ConfigError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@dataclass
class TrainerConfig:
    batch_size: int = MISSING
    batch_mode: str = MISSING  # scored: B samples scored per step; updated: B samples back-propagated
    max_steps: Optional[int] = MISSING
    max_time_s: Optional[float] = MISSING
    eval_every_steps: Optional[int] = MISSING
    eval_every_s: Optional[float] = MISSING
    eval_batch_size: int = MISSING
    optimizer: Any = MISSING
    scheduler: str = MISSING
    warmup_steps: int = MISSING
    precision: str = MISSING
    device: str = MISSING
    progress: str = MISSING


@dataclass
class LoggerConfig:
    backend: str = MISSING  # wandb | none
    mode: str = "auto"
    project: str = "sift-train"
    entity: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class DiagnosticsConfig:
    every_n_steps: Optional[int] = MISSING  # probe every exit layer against the exact loss; null = never


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    diagnostics: DiagnosticsConfig = MISSING
    exit_layer: int = MISSING
    frac: float = MISSING
    criterion: str = MISSING
    seed: int = MISSING
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    targets: list = field(default_factory=list)


ConfigStore.instance().store(name="sift_schema", node=Config)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if str(value) not in allowed:
        raise ConfigError(f"{key}={value} is not allowed; choose one of: {', '.join(allowed)}")


def _positive_or_null(key: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}={value} must be positive (or null to leave it unset)")


def validate(cfg) -> None:
    """Check every value that can be checked without data or model. Raises ConfigError."""
    if not (isinstance(cfg.frac, (int, float)) and 0 < cfg.frac <= 1):
        raise ConfigError(f"frac={cfg.frac} is outside (0, 1]; use e.g. frac=0.5 (frac=1.0 is vanilla training)")
    if cfg.exit_layer < 1:
        raise ConfigError(f"exit_layer={cfg.exit_layer} must be at least 1 (the first block of the model)")
    _one_of("criterion", cfg.criterion, CRITERIA)
    t = cfg.trainer
    if t.batch_size < 1:
        raise ConfigError(f"trainer.batch_size={t.batch_size} must be a positive number of samples")
    _one_of("trainer.batch_mode", t.batch_mode, BATCH_MODES)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.progress", str(t.progress).lower(), PROGRESS)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device):
        raise ConfigError(f"trainer.device={t.device} is not allowed; choose auto, cpu, cuda, cuda:N or mps")
    for key in ("max_steps", "max_time_s", "eval_every_steps", "eval_every_s"):
        _positive_or_null(f"trainer.{key}", t[key])
    _positive_or_null("diagnostics.every_n_steps", cfg.diagnostics.every_n_steps)
    if t.scheduler not in ("constant", "constant_with_warmup") and t.max_steps is None:
        raise ConfigError(f"trainer.scheduler={t.scheduler} decays over trainer.max_steps, which is null; "
                          "set trainer.max_steps or use constant_with_warmup")
    if t.max_steps is None and t.max_time_s is None:
        raise ConfigError("trainer.max_steps and trainer.max_time_s are both null; set at least one budget")
    _one_of("logger.backend", cfg.logger.backend, ("wandb", "none"))
    _one_of("logger.mode", cfg.logger.mode, WANDB_MODES)
    for target in cfg.targets:
        if not 0 < target <= 1:
            raise ConfigError(f"targets contains {target}; target accuracies lie in (0, 1]")


def check_exit_layer(exit_layer: int, depth: int, model_name: str) -> None:
    if exit_layer > depth:
        raise ConfigError(f"exit_layer={exit_layer} is beyond {model_name}, which has {depth} blocks; choose 1..{depth}")


def step_sizes(batch_size: int, frac: float, batch_mode: str) -> tuple[int, int]:
    """(samples drawn and scored, samples back-propagated) per step: ceil(frac*B) of B, or B of ceil(B/frac)."""
    # round first so that 0.3 * 10 (= 3.0000000000000004 in floats) keeps 3, not 4
    if batch_mode == "updated":
        return math.ceil(round(batch_size / frac, 9)), batch_size
    return batch_size, max(1, math.ceil(round(frac * batch_size, 9)))


def method(frac: float, criterion: str, exit_layer: int, depth: int) -> str:
    """The arm a run belongs to, as sift-compare and the W&B dashboard group it."""
    if frac >= 1:
        return "vanilla"
    if criterion == "random":
        return "random"
    if exit_layer >= depth and criterion == "loss":
        return "exact"
    return f"sift-{criterion}"


def run_name(frac: float, criterion: str, exit_layer: int, depth: int, seed: int) -> str:
    arm = method(frac, criterion, exit_layer, depth)
    parts = {"vanilla": [arm], "random": [arm, f"f{frac:g}"]}.get(arm, [arm, f"k{exit_layer}", f"f{frac:g}"])
    return "-".join(parts + [f"s{seed}"])
