"""Structured configs (the schema Hydra checks types against) and the value checks.

The YAML files under conf/ hold the values; these dataclasses hold the types, so a value has one
home. `model` and `data` stay free-form: their keys are the constructor arguments of whatever
`_target_` names, and the target's signature is their schema.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import pkgutil
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sift_cli.records import schedule_parts

CRITERIA = ("loss", "entropy", "random", "gradnorm", "loss_proportional", "diverse")
PEER_CRITERIA = ("gradnorm", "loss_proportional", "diverse")  # the peers' rules, named as they are
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BATCH_MODES = ("scored", "updated")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PROGRESS = ("auto", "true", "false")
SWITCH = ("auto", "true", "false")
# auto (the trainer's choice, see trainer.compile_mode), then torch.compile's documented modes (null: its default)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCHEDULE_UNITS = ("time", "steps", "samples")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
DECAYING = ("linear", "cosine")  # the schedules that run their course over a budget
SELECTION_SCOPES = ("local", "global")
# keys whose value does not change what a run computes: a resumed run may differ in them
# (a compiled step trains as the eager one: measured on a GPU, benchmarks/results/gpu-h200-lpln)
RESUMABLE = ("trainer.max_steps", "trainer.max_time_s", "trainer.progress", "trainer.resume", "trainer.device",
             "trainer.checkpoint_every_s", "trainer.checkpoint_every_steps", "trainer.keep_checkpoints",
             "trainer.eval_batch_size", "trainer.compile", "trainer.compile_mode", "name", "tags", "targets",
             "data.cache_dir", "data.num_workers", "trainer.export")
RESUMABLE_PREFIXES = ("logger.", "diagnostics.")
# an example for each mandatory value a data choice leaves open
EXAMPLES = {"data.paths": "data.paths=[corpus.txt]",
            "data.name": "data.name=wikitext data.config_name=wikitext-103-raw-v1",
            "data.root": "data.root=/path/to/images (one subfolder per class)"}


def decay_budget(scheduler: str, schedule_unit: str, windowed: bool = False) -> Optional[str]:
    """The budget a schedule runs its course over: a decaying learning rate's, which reaches 0 at its end, or a
    selection window's (`windowed`: selection.start and end are fractions of it). None: nothing depends on it."""
    if scheduler not in DECAYING and not windowed:
        return None
    return "trainer.max_time_s" if schedule_unit == "time" else "trainer.max_steps"


class ConfigError(ValueError):
    """A bad value from the user: printed as one line, exit code 2, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message, to quote inside a one-line ConfigError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@dataclass
class TrainerConfig:
    batch_size: int = MISSING
    batch_mode: str = MISSING  # scored: B samples scored per step; updated: B samples back-propagated
    accumulate: int = 1  # micro-batches a step's update runs in (gradient accumulation)
    max_steps: Optional[int] = MISSING
    max_time_s: Optional[float] = MISSING
    eval_every_steps: Optional[int] = MISSING
    eval_every_s: Optional[float] = MISSING
    eval_batch_size: int = MISSING
    optimizer: Any = MISSING
    scheduler: str = MISSING
    schedule_unit: str = MISSING  # time | steps | samples: what warm-up and decay are measured in
    warmup: float = MISSING  # in schedule_unit
    precision: str = MISSING
    compile: str = MISSING
    compile_mode: Optional[str] = "auto"
    deterministic: bool = False
    device: str = MISSING
    selection_scope: str = MISSING
    checkpoint_every_s: Optional[float] = MISSING
    checkpoint_every_steps: Optional[int] = MISSING
    keep_checkpoints: int = MISSING
    resume: str = MISSING  # auto | never | a checkpoint folder
    progress: str = MISSING
    export: str = "auto"  # the model and tokenizer as a save_pretrained folder, <run>/hf; auto: text models


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
class SelectionConfig:
    """When a step selects: inside [start, end) of the budget (fractions, in trainer.schedule_unit), on one step
    in `every`. Every other step is the step vanilla takes."""

    start: float = 0.0
    end: float = 1.0
    every: int = 1

    @staticmethod
    def windowed(node) -> bool:
        """Whether the window leaves out part of the budget (and so depends on where the budget ends)."""
        return node.get("start", 0.0) > 0 or node.get("end", 1.0) < 1


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    diagnostics: DiagnosticsConfig = MISSING
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    exit_layer: Any = MISSING  # 1..depth, or "depth": the exact loss of whatever model is chosen
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


def _unknown_keys(node, schema, prefix: str) -> None:
    """A key the schema does not know (a typo added with +) is an error naming the closest known key."""
    known = [f.name for f in fields(schema)]
    for key in node.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key} is not a known key{hint}")


def _missing_values(cfg) -> None:
    for key in OmegaConf.missing_keys(cfg):
        example = EXAMPLES.get(key, f"{key}=VALUE")
        raise ConfigError(f"{key} is required and has no value; set it on the command line, e.g. {example}")


def _interpolations(cfg) -> None:
    """Every ${...} resolves: a missing environment variable or key is one line naming where it is used."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        raise ConfigError(f"{err.full_key} cannot be resolved: {first_line(err)}") from None


def model_depth(cfg, model: type) -> Optional[int]:
    """The model's number of blocks from its config and class alone, without building it (None: from a
    checkpoint)."""
    if cfg.model.get("pretrained"):
        return None
    return cfg.model.get("num_layers") or getattr(model, "depth", None)


def validate(cfg, choices: Optional[dict] = None) -> None:
    """Check every value that can be checked without data or model. Raises ConfigError.

    choices: the config groups' choices (e.g. model=bert_tiny), for messages; the targets' names otherwise."""
    _unknown_keys(cfg, Config, "")
    _unknown_keys(cfg.trainer, TrainerConfig, "trainer.")
    _unknown_keys(cfg.logger, LoggerConfig, "logger.")
    _unknown_keys(cfg.selection, SelectionConfig, "selection.")
    _interpolations(cfg)
    _missing_values(cfg)
    model_name = choice_name(cfg, choices, "model")
    model = importable("model", cfg.model._target_, "sift_cli.models.bert.BertMLM")
    check_arguments("model", cfg.model, model)
    data = importable("data", cfg.data._target_, "sift_cli.data.text.text_files")
    check_arguments("data", cfg.data, data)
    check_task(model, getattr(inspect.signature(data, eval_str=True).return_annotation, "task", None), model_name,
               choice_name(cfg, choices, "data"))
    if not (isinstance(cfg.frac, (int, float)) and 0 < cfg.frac <= 1):
        raise ConfigError(f"frac={cfg.frac} is outside (0, 1]; use e.g. frac=0.5 (frac=1.0 is vanilla training)")
    if cfg.seed < 0:  # numpy's generators, and the seeds derived from this one, take none below 0
        raise ConfigError(f"seed={cfg.seed} must be 0 or more")
    if cfg.exit_layer != "depth" and not (isinstance(cfg.exit_layer, int) and not isinstance(cfg.exit_layer, bool)):
        raise ConfigError(f"exit_layer={cfg.exit_layer} is not allowed; give a block number (1 is the first) or "
                          f"depth (the last: the exact loss)")
    if cfg.exit_layer != "depth" and cfg.exit_layer < 1:
        raise ConfigError(f"exit_layer={cfg.exit_layer} must be at least 1 (the first block of the model)")
    check_window(cfg.selection)
    _one_of("criterion", cfg.criterion, CRITERIA)
    t = cfg.trainer
    for key in ("batch_size", "eval_batch_size"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]} must be a positive number of samples")
    if t.accumulate < 1:
        raise ConfigError(f"trainer.accumulate={t.accumulate} must be a whole number >= 1 (micro-batches per step; "
                          f"1: no accumulation)")
    check_optimizer(t.optimizer)
    if str(t.resume) not in ("auto", "never") and not Path(t.resume).expanduser().is_dir():
        raise ConfigError(f"trainer.resume={t.resume} is not a folder; name a run's checkpoints/step-N folder, or "
                          f"use trainer.resume=auto or never")
    _one_of("trainer.batch_mode", t.batch_mode, BATCH_MODES)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.compile", str(t.compile).lower(), SWITCH)
    if t.compile_mode is not None:
        _one_of("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    _one_of("trainer.schedule_unit", t.schedule_unit, SCHEDULE_UNITS)
    _one_of("trainer.scheduler", t.scheduler, SCHEDULERS)
    _one_of("trainer.selection_scope", t.selection_scope, SELECTION_SCOPES)
    _one_of("trainer.progress", str(t.progress).lower(), PROGRESS)
    _one_of("trainer.export", str(t.export).lower(), SWITCH)
    if str(t.export).lower() == "true" and not hasattr(model, "save_pretrained"):
        raise ConfigError(f"trainer.export=true but model={model_name} has no transformers form to save "
                          f"(save_pretrained); use trainer.export=auto or false")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device):
        raise ConfigError(f"trainer.device={t.device} is not allowed; choose auto, cpu, cuda, cuda:N or mps")
    for key in ("max_steps", "max_time_s", "eval_every_steps", "eval_every_s", "checkpoint_every_s",
                "checkpoint_every_steps"):
        _positive_or_null(f"trainer.{key}", t[key])
    _positive_or_null("diagnostics.every_n_steps", cfg.diagnostics.every_n_steps)
    if t.keep_checkpoints < 1:
        raise ConfigError(f"trainer.keep_checkpoints={t.keep_checkpoints} must be at least 1")
    if t.warmup < 0:
        raise ConfigError(f"trainer.warmup={t.warmup} must be 0 or more ({t.schedule_unit} of warm-up)")
    if t.max_steps is None and t.max_time_s is None:
        raise ConfigError("trainer.max_steps and trainer.max_time_s are both null; set at least one budget")
    if budget := decay_budget(t.scheduler, t.schedule_unit, SelectionConfig.windowed(cfg.selection)):
        if t[budget.split(".")[1]] is None:
            instead = ("use trainer.schedule_unit=time to measure it in the time budget, or set trainer.max_steps"
                       if t.schedule_unit != "time" else "set trainer.max_time_s, or trainer.schedule_unit=steps")
            what = (f"trainer.scheduler={t.scheduler} with trainer.schedule_unit={t.schedule_unit} decays over "
                    f"{budget}" if t.scheduler in DECAYING else
                    f"selection.start={cfg.selection.start} and selection.end={cfg.selection.end} are fractions of "
                    f"{budget} (trainer.schedule_unit={t.schedule_unit})")
            raise ConfigError(f"{what}, which is null; {instead}")
    _one_of("logger.backend", cfg.logger.backend, ("wandb", "none"))
    _one_of("logger.mode", cfg.logger.mode, WANDB_MODES)
    for target in cfg.targets:
        if not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ConfigError(f"targets contains {target}; target accuracies lie in (0, 1]")
    pretrained = str(cfg.model.get("pretrained") or "")
    if pretrained.startswith(("/", "./", "../", "~")) and not Path(pretrained).expanduser().is_dir():
        raise ConfigError(f"model.pretrained={pretrained} is not a folder; name a folder written by save_pretrained, "
                          f"or a hub name such as bert-base-uncased")
    depth = model_depth(cfg, model)
    if depth is not None:
        check_exit_layer(cfg.exit_layer, depth, model_name)
    check_positions(cfg.data.get("seq_len"), None if cfg.model.get("pretrained") else cfg.model.get("max_position"))


def code_defaults(config: dict) -> dict:
    """The value the code gives each key that has a default there, nested as `config` is: the model's and the
    data's from their targets' signatures, the others from the schema. A key that a newer version added holds
    its default in a run saved before it: a new option's default keeps the behaviour from before it."""
    def given(schema) -> dict:
        values = {}
        for f in fields(schema):
            if f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            elif f.default not in (MISSING, dataclasses.MISSING):  # MISSING: the YAML files give the value
                values[f.name] = f.default
        return values

    defaults = {**given(Config), "trainer": given(TrainerConfig), "logger": given(LoggerConfig),
                "diagnostics": given(DiagnosticsConfig), "selection": given(SelectionConfig)}
    for group in ("model", "data"):
        try:
            target = pkgutil.resolve_name(config[group]["_target_"])
        except (KeyError, TypeError, ImportError, AttributeError, ValueError):
            continue  # an older run's target that is gone: none of its keys has a default to go by
        defaults[group] = {name: p.default for name, p in inspect.signature(target).parameters.items()
                           if p.default is not inspect.Parameter.empty}
    return defaults


def importable(key: str, name: str, example: str) -> Any:
    """What a `_target_` names, imported; one line naming it where it cannot be."""
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_={name} cannot be imported ({first_line(err)}); name a class or "
                          f"function, e.g. {example}") from None


SCALAR_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
                type(None): "null"}


def _fits(annotation: Any, value: Any) -> bool:
    """Whether a config value (plain Python) fits a parameter's annotation; what this does not know fits."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if annotation in (int, float) and isinstance(value, bool):  # YAML's true is not a number
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    if annotation in SCALAR_NAMES:
        return isinstance(value, annotation)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(args[0], v) for v in value))
    return True


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence) and args:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s"
    return SCALAR_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _as_typed(value: Any) -> str:
    """A config value as a user writes it on the command line: true, null, [a,b]."""
    if isinstance(value, (list, tuple)):
        return f"[{','.join(_as_typed(v) for v in value)}]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def check_arguments(key: str, node: Any, fn: Callable) -> None:
    """A free-form group (model, data) against its target's signature, which is its schema: a key the target
    does not take, or a value its annotation does not allow, is one line before any work."""
    params = inspect.signature(fn, eval_str=True).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for name, value in OmegaConf.to_container(node, resolve=True).items():
        if name == "_target_":
            continue
        if name not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean {key}.{close[0]}?" if close else f"its keys: {', '.join(params)}"
            raise ConfigError(f"{key}.{name} is not a key of {node._target_}; {hint}")
        annotation = params[name].annotation
        if annotation is not inspect.Parameter.empty and not _fits(annotation, value):
            raise ConfigError(f"{key}.{name}={_as_typed(value)} is not {_describe(annotation)}")


def check_optimizer(node: Any) -> None:
    """trainer.optimizer built for one parameter, so that torch's own checks of its values (a negative rate,
    betas outside [0, 1)) and a wrong target or key fail before any work, as one line."""
    from hydra.utils import instantiate

    if not (isinstance(node, DictConfig) and "_target_" in node):
        raise ConfigError(f"trainer.optimizer={node} is not an optimizer config; set trainer.optimizer._target_ "
                          f"(e.g. torch.optim.AdamW) and its arguments")
    importable("trainer.optimizer", node._target_, "torch.optim.AdamW")
    try:
        instantiate(node)(params=[torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:
        cause = first_line(err.__cause__ or err)
        hint = "; remove a key with ~trainer.optimizer.KEY" if "unexpected keyword" in cause else ""
        raise ConfigError(f"trainer.optimizer ({node._target_}) refuses its settings: {cause}{hint}") from None


def check_positions(seq_len: Optional[int], positions: Optional[int]) -> None:
    """A sequence must fit the model's positions: known from its config, or from its checkpoint once loaded."""
    if positions and seq_len and seq_len > positions:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's {positions} positions "
                          f"(model.max_position); use data.seq_len={positions} or less")


def choice_name(cfg, choices: Optional[dict], group: str) -> str:
    """How messages name a group's value: the user's choice (model=bert), else its target's name (BertMLM)."""
    return (choices or {}).get(group) or cfg[group]._target_.rsplit(".", 1)[-1]


def check_task(model: type, data_task: Optional[str], model_name: str, data_name: str) -> None:
    """A model trains on one kind of data (its class's `task`, e.g. mlm or image); the data must be of that kind.
    data_task: the data's, from the built data or its target's return annotation (None: not known yet)."""
    task = getattr(model, "task", None)
    if task and data_task and task != data_task:
        raise ConfigError(f"model={model_name} trains on {task} data but data={data_name} is {data_task} data; "
                          f"pick a data choice of the same task")


def check_window(node, name: str = "selection.{}", budget: str = "trainer.schedule_unit") -> None:
    """selection.start/end: fractions of the budget, start below end; selection.every: a whole number >= 1.
    `name` and `budget` say them in the caller's words (SiftTrainer's selection_start, of max_steps)."""
    start, end, every = (name.format(key) for key in ("start", "end", "every"))
    for key in ("start", "end"):
        value = getattr(node, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{name.format(key)}={value} is outside [0, 1]; it is a fraction of the budget "
                              f"({budget}), e.g. {start}=0.5")
    if node.start >= node.end:
        raise ConfigError(f"{start}={node.start} is not below {end}={node.end}: the window would "
                          f"hold no step; use start < end (frac=1.0 trains without selection)")
    if isinstance(node.every, bool) or not isinstance(node.every, int) or node.every < 1:
        raise ConfigError(f"{every}={node.every} is not allowed; select on one step in every N, N a whole "
                          f"number >= 1 (1: every step; 2: Composer's interrupt=2)")


def exit_block(exit_layer, depth: int) -> int:
    """The block the cheap pass stops after: exit_layer, or the last block for exit_layer=depth."""
    return depth if exit_layer == "depth" else exit_layer


def check_exit_layer(exit_layer, depth: int, model_name: str) -> None:
    if exit_block(exit_layer, depth) > depth:
        raise ConfigError(f"exit_layer={exit_layer} is beyond {model_name}, which has {depth} blocks; choose 1..{depth}")


def step_sizes(batch_size: int, frac: float, batch_mode: str) -> tuple[int, int]:
    """(samples drawn and scored, samples back-propagated) per step: ceil(frac*B) of B, or B of ceil(B/frac).

    Under several processes this is applied to each process's share of the batch."""
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
    return criterion if criterion in PEER_CRITERIA else f"sift-{criterion}"


def run_name(frac: float, criterion: str, exit_layer: int, depth: int, seed: int, batch_mode: str = "scored",
             schedule: tuple[float, float, int] = (0.0, 1.0, 1)) -> str:
    arm = method(frac, criterion, exit_layer, depth)
    parts = {"vanilla": [arm], "random": [arm, f"f{frac:g}"]}.get(arm, [arm, f"k{exit_layer}", f"f{frac:g}"])
    if arm != "vanilla":  # the defaults stay out of the name
        parts += ([batch_mode] if batch_mode != "scored" else []) + [
            f"w{p}" if "-" in p else f"every{p[1:]}" for p in schedule_parts(*schedule)]
    return "-".join(parts + [f"s{seed}"])
