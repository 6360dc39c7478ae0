"""`sift-train`: compose the config, check it, build data and model, train, record."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sift_cli.config import ConfigError, check_exit_layer, method, run_name, validate
from sift_cli.records import Recorder, time_to_target
from sift_cli.trainer import fit

log = logging.getLogger("sift_cli")
CONF = Path(__file__).resolve().parents[1] / "conf"
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    return device


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, letting a ConfigError raised by the target through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        cause, name = err.__cause__, node._target_.rsplit(".", 1)[-1]
        if isinstance(cause, TypeError) and str(cause).startswith(name) and "argument" in str(cause):
            # the target's signature refused a key (or misses one); any other TypeError is a bug
            raise ConfigError(f"{node._target_} does not accept this config: {cause}") from None
        raise


def run(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None, sweep: Optional[str] = None,
        show_progress: bool = False) -> dict:
    """One training run, from a composed config to a complete record in `run_dir`."""
    validate(cfg)
    choices = choices or {}
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    data = build(cfg.data)
    model_name = choices.get("model") or cfg.model._target_.rsplit(".", 1)[-1]
    task = get_class(cfg.model._target_).task
    if task != data.task:
        raise ConfigError(f"model={model_name} trains on {task} data but data={choices.get('data', '?')} "
                          f"is {data.task} data; pick a data choice of the same task")
    model = build(cfg.model, **data.model_args).to(device)
    check_exit_layer(cfg.exit_layer, model.depth, model_name)
    arm = method(cfg.frac, cfg.criterion, cfg.exit_layer, model.depth)
    name = run_name(cfg.frac, cfg.criterion, cfg.exit_layer, model.depth, cfg.seed)
    log.info("%s on %s: %s, %s parameters, %s", name, device, data.describe(),
             f"{sum(p.numel() for p in model.parameters()):,}", run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    record = Recorder(run_dir, cfg.logger, config, name=name, group=cfg.name or sweep, job_type=arm,
                      tags=list(cfg.tags))
    totals = fit(model, data, cfg, record, device, show_progress)
    targets = {}
    for target in cfg.targets:
        hit = time_to_target(record.rows, target)
        targets[f"time_to_target/{target:g}"] = hit["train_time_s"] if hit else None
        targets[f"steps_to_target/{target:g}"] = hit["step"] if hit else None
    summary = {"method": arm, "run_name": name, "task": task, "model": model_name,
               "data": choices.get("data"), "depth": model.depth, "exit_layer": cfg.exit_layer,
               "frac": cfg.frac, "criterion": cfg.criterion, "seed": cfg.seed, "device": str(device),
               **totals, "targets": targets, "run_dir": str(run_dir), "torch": torch.__version__,
               "config": config}
    record.finish(summary)
    print(f"{name}: val_acc {totals['final_val_acc']:.4f} (best {totals['best_val_acc']:.4f}) | "
          f"train {totals['train_time_s']:.1f} s, {totals['steps']} steps | "
          f"{totals['samples_backpropagated']:,} of {totals['samples_seen']:,} samples back-propagated | {run_dir}")
    return summary


def fail(err: Exception) -> None:
    print(f"sift-train: error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    progress = str(cfg.trainer.progress).lower()
    show = progress == "true" or (progress == "auto" and not multirun and sys.stdout.isatty())
    sweep = f"sweep-{Path(hc.sweep.dir).name}" if multirun else None
    try:
        summary = run(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), sweep, show)
    except ConfigError as err:
        fail(err)
    return summary["final_val_acc"]  # what a Hydra sweeper optimises


def _combinations(overrides: list[str]) -> list[list[str]]:
    """Every job a (multi)run would launch, as plain override lists, parsed by Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    options = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            options.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            options.append([o.input_line])
    return [list(c) for c in itertools.product(*options)]


def precheck(args: list[str]) -> None:
    """Compose and validate every job before any runs, so a bad value costs one line, not a sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    if any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in args):
        return
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.startswith("hydra")]
    try:
        jobs = _combinations(overrides)
    except HydraException:
        return  # a sweep syntax this check does not expand (intervals, globs): Hydra reports it
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for job in jobs:
                try:
                    validate(compose(config_name="config", overrides=job))
                except MissingConfigException as err:  # an unknown choice in a config group
                    group, _, value = (err.missing_cfg_file or "").partition("/")
                    if not err.options:
                        raise ConfigError(_first_lines(err)) from None
                    raise ConfigError(f"{group}={value} is not a known {group}; choose one of: "
                                      f"{', '.join(sorted(err.options))}") from None
                except HydraException as err:
                    raise ConfigError(_first_lines(err)) from None
    finally:
        GlobalHydra.instance().clear()


def _first_lines(err: Exception) -> str:
    """Hydra's own message, the first two lines (what went wrong, then why) joined into one."""
    text = f"{err}\n{err.__cause__ or ''}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except ConfigError as err:
        fail(err)
    hydra_main()


if __name__ == "__main__":
    main()
