"""`sift-train`: compose the config, check it, build data and model, train, record."""

from __future__ import annotations

import datetime
import difflib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sift_cli import __version__, distributed
from sift_cli.checkpoint import (Checkpointer, InvalidCheckpoint, changed_keys, check_data, check_folder, check_lost,
                                 decay_note, holds_run, load_tensors, read_run, verify)
from sift_cli.config import (DECAYING, ConfigError, SelectionConfig, check_exit_layer, check_positions, check_task,
                             choice_name, decay_budget, exit_block, first_line, method, run_name, validate)
from sift_cli.faults import kill_point
from sift_cli.hardware import accelerator
from sift_cli.interrupts import BEFORE_ANY_RUN, catch_early_interrupts, check_interrupted, interrupted
from sift_cli.records import COMPLETED, DIAGNOSTICS, METRICS, SUMMARY, Recorder, write_atomic
from sift_cli.trainer import fit

log = logging.getLogger("sift_cli")
CONF = Path(__file__).resolve().parents[1] / "conf"
PACKAGE = Path(__file__).resolve().parent
_python_warning = warnings.formatwarning
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
STAMP = "SIFT_RUN_STAMP"  # the run's start time and a random suffix: default folder names never collide
REPEATS = "SIFT_SWEEP_REPEATS"  # {job number: the earlier job of the sweep it would train again}, for the jobs
# what frac=1.0 (vanilla) trains alike whatever they say, as sift-compare counts such runs once
VANILLA_IGNORES = {"": ("criterion", "exit_layer"), "trainer": ("batch_mode", "selection_scope"),
                   "selection": ("start", "end", "every")}


def _stamp() -> str:
    if STAMP not in os.environ:
        os.environ[STAMP] = f"{datetime.datetime.now().timestamp():.6f}-{secrets.token_hex(4)}"
    return os.environ[STAMP]


def run_stamp(fmt: str) -> str:
    """`${run_stamp:%Y-%m-%d/%H-%M-%S}` in folder names: the start time and a suffix, the same in every process."""
    seconds, suffix = _stamp().split("-")
    return f"{datetime.datetime.fromtimestamp(float(seconds)).strftime(fmt)}-{suffix}"


OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)
# under several processes only rank 0 writes the run folder: the others get no .hydra/ copy and their own log
OmegaConf.register_new_resolver("launch_rank", distributed.launch_rank, replace=True)
OmegaConf.register_new_resolver("main_only", lambda value, other=None: value if distributed.launch_rank() == 0
                                else other, replace=True)


class Stopped(Exception):
    """The run stopped before its budget (Ctrl-C, preemption); its record and checkpoint are written."""

    def __init__(self, status: str, signum: Optional[int]):
        super().__init__(status)
        self.status, self.signum = status, signum

    def exit(self) -> None:
        if self.status == "preempted" and self.signum:
            # hand the signal to whoever had it before us: submitit requeues, the default handler ends the
            # process as the signal would have; if it was ignored, exit with the conventional status
            signal.raise_signal(self.signum)
            sys.exit(128 + self.signum)
        sys.exit(130)  # Ctrl-C: a sweep stops here instead of starting its next job


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.gpu_index())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name} but MPS is not available; use trainer.device=auto or cpu")
    return device


def build(node: DictConfig, refusal_of: Optional[str] = None, **kwargs):
    """hydra.utils.instantiate, letting a ConfigError raised by the target through unwrapped (validate has
    checked the node's keys and types against the target's signature). With `refusal_of` (the config key), a
    ValueError from the target is a value it refuses, e.g. HF's check that heads divide the hidden size, and
    becomes one line too."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        if refusal_of and isinstance(err.__cause__, ValueError):
            raise ConfigError(f"{refusal_of} ({node._target_}) refuses its settings: {first_line(err.__cause__)}"
                              ) from None
        raise


def not_writable(folder: Path, what: str, why: str) -> ConfigError:
    return ConfigError(f"the {what} {folder} is not writable ({why}); choose another folder or fix its permissions")


def writable(folder: Path, what: str) -> None:
    """A folder the run must write to: one line naming it when it cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise not_writable(folder, what, err.strerror) from None


def can_make(folder: Path, what: str) -> None:
    """Before anything is written: a folder that exists, or could be made, and could be written to, judged by its
    nearest existing ancestor (access(2) sees a read-only file system as well as permissions)."""
    folder = folder.expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise not_writable(folder, what, f"{existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise not_writable(folder, what, "read-only file system" if read_only_mount(existing) else
                           "permission denied")


def read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def run(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None, sweep: Optional[str] = None,
        show_progress: bool = False) -> dict:
    """One training run, from a composed config to a complete record in `run_dir`: new, resumed or extended."""
    validate(cfg, choices)
    distributed.init()
    world = distributed.world()
    if cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must be divisible by the {world} processes "
                          f"of this run; use a multiple of {world}")
    choices, run_dir = choices or {}, Path(run_dir)
    main = distributed.is_main()
    config = OmegaConf.to_container(cfg, resolve=True)

    def folder_action() -> str:  # on rank 0 alone; a refusal is raised on every rank
        writable(run_dir, "run folder")
        return check_folder(run_dir, config, str(cfg.trainer.resume))

    action = distributed.from_main(folder_action)
    if action == "done":
        summary = distributed.from_main(lambda: read_summary(run_dir))
        if main:
            budget = decay_budget(cfg.trainer.scheduler, cfg.trainer.schedule_unit,
                                  SelectionConfig.windowed(cfg.selection))
            course = ("its learning rate decayed over" if cfg.trainer.scheduler in DECAYING else
                      "its selection window is a share of")
            further = (f"{course} {budget}: train longer in a new folder" if budget else
                       "raise trainer.max_steps or trainer.max_time_s to train it further")
            print(f"{summary['run_name']}: already completed in {run_dir} ({further})")
        return summary
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)  # set either way: a sweep's jobs share a process
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    kill_point("data", 0)
    data = build(cfg.data)
    check_interrupted()
    check_same_data(data)
    model_name = choice_name(cfg, choices, "model")
    check_task(get_class(cfg.model._target_), data.task, model_name, choice_name(cfg, choices, "data"))
    model = build(cfg.model, "model", **data.model_args).to(device)
    check_interrupted()
    check_exit_layer(cfg.exit_layer, model.depth, model_name)
    check_positions(cfg.data.get("seq_len"), getattr(model, "max_length", None))  # a checkpoint's own limit
    exit_layer = exit_block(cfg.exit_layer, model.depth)
    schedule = (cfg.selection.start, cfg.selection.end, cfg.selection.every)
    # trainer.export: auto and true (which validate() allows only for such models) for one with a transformers form
    exporting = str(cfg.trainer.export).lower() != "false" and hasattr(model, "save_pretrained")
    arm = method(cfg.frac, cfg.criterion, exit_layer, model.depth)
    name = run_name(cfg.frac, cfg.criterion, exit_layer, model.depth, cfg.seed, cfg.trainer.batch_mode, schedule)
    if main:
        log.info("%s on %s x%d: %s, %s parameters, %s", name, device, world, data.describe(),
                 f"{sum(p.numel() for p in model.parameters()):,}", run_dir)

    checkpointer = Checkpointer(run_dir, cfg.trainer.keep_checkpoints)
    resumed, previous = None, read_run(run_dir) if main else None
    if main:  # first: a save cut short between its two renames left the checkpoint it replaces aside
        checkpointer.clean()
    fingerprint = getattr(data, "fingerprint", None)
    if action == "resume":
        found = distributed.from_main(lambda: resume_point(run_dir, checkpointer, str(cfg.trainer.resume), config))
        if found is not None:
            check_data(found[0], found[1], fingerprint)
        resumed = None if found is None else (load_tensors(found[0]), found[1])
    if main:
        wandb_id = (previous or {}).get("wandb_id") or secrets.token_hex(4)
        write_atomic(run_dir / "run.json", json.dumps({"run_name": name, "wandb_id": wandb_id, "config": config},
                                                      indent=1))
    else:
        wandb_id = None
    positions = resumed[1]["positions"] if resumed else {}
    about = {"method": arm, "run_name": name, "task": data.task, "model": model_name, "data": choices.get("data"),
             "depth": model.depth, "exit_layer": exit_layer, "frac": cfg.frac, "criterion": cfg.criterion,
             "selection": dict(zip(("start", "end", "every"), schedule)),
             "seed": cfg.seed, "device": device.type, "accelerator": accelerator(device), "world_size": world,
             **getattr(data, "setting", {}), "data_fingerprint": fingerprint,
             "run_dir": str(run_dir), "torch": torch.__version__,
             "sift_train": __version__}
    record = Recorder(run_dir, cfg.logger, config, name=name, group=cfg.name or sweep, job_type=arm,
                      tags=list(cfg.tags), wandb_id=wandb_id, positions=positions, enabled=main, about=about,
                      targets=cfg.targets)
    if resumed and main:
        log.info("resuming %s from step %d", name, resumed[1]["train_state"]["step"])
    try:
        totals = fit(model, data, cfg, record, device, show_progress, checkpointer, resumed,
                     meta={"config": config, "wandb_id": wandb_id, "data_fingerprint": fingerprint})
    except torch.cuda.OutOfMemoryError as err:  # torch.cuda's name: torch 2.4 lacks the alias torch.OutOfMemoryError
        # a batch too large for the device: a setting to change, not a bug
        found = ". ".join(first_line(err).split(". ")[:3])  # what was asked for, and what the device has
        raise ConfigError(f"{accelerator(device)} ran out of memory ({found}) with model={model_name}, "
                          f"trainer.batch_size={cfg.trainer.batch_size} over {world} process(es) and "
                          f"trainer.eval_batch_size={cfg.trainer.eval_batch_size}; lower them or add GPUs") from None
    if exporting and main:  # before the summary: a run recorded as finished has its export
        log.info("exported the model and tokenizer to %s (transformers' from_pretrained loads it)",
                 export(model, data, run_dir))
    summary = record.finish(totals)
    if main:
        print(f"{name}: {summary['status']} | val_acc {totals['final_val_acc']:.4f} "
              f"(best {totals['best_val_acc']:.4f}) | train {totals['train_time_s']:.1f} s, {totals['steps']} steps | "
              f"{totals['samples_backpropagated']:,} of {totals['samples_seen']:,} samples back-propagated "
              f"| {totals['data_passes']:,.2f} passes over the training data | {run_dir}")
    if summary["status"] != COMPLETED:
        raise Stopped(summary["status"], totals["stop_signal"])
    return summary


def export(model, data, run_dir: Path) -> Path:
    """The model and its tokenizer as one save_pretrained folder, <run>/hf: AutoModelForMaskedLM (a BERT) or
    AutoModelForCausalLM (a decoder) and AutoTokenizer load it without sift-train, and model.pretrained takes it
    back. Written beside it and then moved into place, so the folder is never half written."""
    folder, partial = run_dir / "hf", run_dir / "hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    data.tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY).read_text())


def resume_point(run_dir: Path, checkpointer: Checkpointer, resume: str, config: dict):
    """(folder, state) of the checkpoint to continue from: the newest valid one here, or the one `resume` names."""
    if resume == "auto":
        found = checkpointer.newest()
        if found is None:
            check_lost(run_dir)
        return found
    folder = Path(resume).expanduser()
    try:
        state = verify(folder)
    except InvalidCheckpoint as err:
        raise ConfigError(f"trainer.resume={resume} is not a valid checkpoint folder ({err}); name a checkpoints/"
                          f"step-N folder of a run, with its manifest.json, or use trainer.resume=auto or never"
                          ) from None
    differ = changed_keys(state["config"], config)
    if differ:
        raise ConfigError(f"trainer.resume={resume} was trained with another config ({', '.join(differ[:4])})"
                          f"{decay_note(differ, config)}; rerun with its values")
    source = folder.parent.parent
    if source.resolve() != run_dir.resolve():  # a fork: the new folder starts with the source's records
        if holds_run(run_dir):
            raise ConfigError(f"the run folder {run_dir} already holds a run; resume {resume} into a new folder")
        for file in (METRICS, DIAGNOSTICS):
            if (source / file).exists():
                shutil.copyfile(source / file, run_dir / file)
    return folder, state


def warning_line(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one line, as our errors are; other libraries' as Python prints them."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        return f"sift-train: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


def remove_unused(folder: Path, log_name: str) -> None:
    """The folder of a run refused before it began, when it holds only what Hydra put there (.hydra/ and the log):
    no folder is left behind for a run that never was."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if entries and all(entry.name in (".hydra", log_name) for entry in entries):
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        folder.rmdir()


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
    earlier = json.loads(os.environ.get(REPEATS, "{}")).get(str(hc.job.num)) if multirun else None
    if earlier is not None:  # nothing to train that an earlier job of this sweep does not
        if distributed.is_main():
            print(f"sift-train: skipping job {hc.job.num} ({' '.join(hc.overrides.task)}): it trains as job {earlier} "
                  f"does")
            remove_unused(Path(hc.runtime.output_dir), f"{hc.job.name}.log")
        return None
    try:
        summary = run(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), sweep, show)
    except ConfigError as err:
        # a sweep's job folder stays (sift-compare names the failed job), and so does one that other processes of
        # the run share: they may still be making their logs in it
        if not multirun and distributed.launch_world() == 1:
            remove_unused(Path(hc.runtime.output_dir), f"{hc.job.name}.log")
        fail(err)
    except Stopped as stopped:
        if stopped.status == "interrupted" and distributed.is_main():  # a default folder's name is new each time
            folder = f"hydra.sweep.dir={hc.sweep.dir}" if multirun else f"hydra.run.dir={hc.runtime.output_dir}"
            print(f"sift-train: to train on from its checkpoint, rerun the same command with {folder}", file=sys.stderr)
        stopped.exit()
    except KeyboardInterrupt:  # Ctrl-C before training began (reading data, compiling), or a second one
        interrupted(f"; {hc.runtime.output_dir} keeps what was written before (a checkpoint only if training had "
                    "reached one)")
    return summary["final_val_acc"]  # what a Hydra sweeper optimises


# --- before anything runs: every job of a (multi)run composed and checked -------------------


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


TYPE_NAMES = {"Float": "a number", "Integer": "a whole number"}


def _override_error(err: Exception) -> Optional[str]:
    """Hydra's account of an override it refused, as our one line: a typo of a key (with the closest known key)
    or a value of the wrong type."""
    from sift_cli.config import Config, LoggerConfig, SelectionConfig, TrainerConfig

    scalar = re.search(r"Error merging override ([^=\s]+)=(.*?) Invalid value assigned: \w+ is not a ListConfig",
                       f"{err} {err.__cause__}", re.S)
    if scalar:
        key, value = scalar.groups()
        return f"{key}={value} is not a list; write {key}=[{value}]"
    wrong_type = re.search(r"Error merging override ([^=\s]+)=(.*?) Value .*?(?:converted to (\w+)|not a valid bool)",
                           f"{err} {err.__cause__}", re.S)
    if wrong_type:
        key, value, kind = wrong_type.groups()
        return f"{key}={value} is not {TYPE_NAMES.get(kind, kind or 'true or false')}"
    found = re.search(r"Could not override '([^']+)'", str(err))
    if not found:
        return None
    key = found.group(1)
    parent, _, leaf = key.rpartition(".")
    schema = {"": Config, "trainer": TrainerConfig, "logger": LoggerConfig, "selection": SelectionConfig}.get(parent)
    known = [f.name for f in fields(schema)] if schema else []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    return f"{key} is not a known key{hint}"


MULTIRUN_FLAGS = ("--multirun", "-m")


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def check_flag_order(args: list[str]) -> None:
    """Hydra's parser takes the overrides as one run of arguments: with --multirun between two of them, it reads
    none after the flag and prints its usage. Say so in one line."""
    overrides = [i for i, a in enumerate(args) if is_override(a)]
    split = [a for i, a in enumerate(args) if a in MULTIRUN_FLAGS and overrides and overrides[0] < i < overrides[-1]]
    if split:
        rest = " ".join(a for a in args if a not in MULTIRUN_FLAGS)
        raise ConfigError(f"{split[0]} must come before the overrides; run: sift-train --multirun {rest}")


def add_overrides(argv: list[str], added: list[str]) -> None:
    """`added` into the command line Hydra reads, after its last override (the overrides are one run)."""
    last = max((i for i, a in enumerate(argv) if i and is_override(a)), default=len(argv) - 1)
    argv[last + 1:last + 1] = added


def override_value(overrides: list[str], key: str) -> Optional[str]:
    """The value an override list gives `key` (`key=v`, `+key=v` or `++key=v`), the last one winning."""
    values = [a.split("=", 1)[1] for a in overrides if "=" in a and a.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def check_launcher(overrides: list[str], multirun: bool, jobs: Optional[int]) -> list[str]:
    """The launcher's traps, before Hydra meets them: SLURM's launcher outside a sweep (Hydra ignores it and
    trains here, on a login node) or where there is no SLURM (a traceback from submitit). submitit_local
    starts every job of a sweep at once, which makes their times measure one another: it gets one job at a
    time unless hydra.sweeper.max_batch_size says otherwise. `jobs`: how many (None: a sweep syntax not expanded
    here). Returns overrides to add."""
    launcher = override_value(overrides, "hydra/launcher")
    if launcher == "slurm" and not multirun:
        raise ConfigError("hydra/launcher=slurm works only under --multirun (without it Hydra trains here, e.g. on "
                          "a login node); run: sift-train --multirun hydra/launcher=slurm ... (one job is a sweep of "
                          "one)")
    if launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("hydra/launcher=slurm needs SLURM, but sbatch and srun are not on this machine's PATH; run "
                          "the command on the cluster's login node, or use hydra/launcher=submitit_local to run the "
                          "same path on this machine")
    if launcher != "submitit_local" or not multirun or (jobs is not None and jobs < 2):
        return []
    batch = override_value(overrides, "hydra.sweeper.max_batch_size")
    if batch is None:
        count = f"{jobs} " if jobs else ""
        print(f"sift-train: hydra/launcher=submitit_local runs the sweep's {count}jobs one at a time, so that their "
              f"times compare (jobs started together share this machine); hydra.sweeper.max_batch_size=N runs N at "
              f"once", file=sys.stderr)
        return ["hydra.sweeper.max_batch_size=1"]
    at_once = "every job" if batch in ("null", "None") else f"{batch} jobs" if batch.isdigit() and int(batch) > 1 \
        else None
    if at_once:
        warnings.warn(f"hydra.sweeper.max_batch_size={batch} with hydra/launcher=submitit_local runs {at_once} of "
                      f"the sweep at once on this machine: they share its cores, so their times measure one "
                      f"another's load as well")
    return []


def training_identity(cfg: DictConfig) -> str:
    """What a job trains, as text: equal for two jobs that would train the same run."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if config["frac"] >= 1:
        for section, keys in VANILLA_IGNORES.items():
            for key in keys:
                (config[section] if section else config).pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


def note_repeats(identities: list[str], jobs: list[list[str]]) -> None:
    """Tell the sweep's jobs which of them would train an earlier job's run again (vanilla under each criterion
    of `frac=0.5,1.0 criterion=loss,entropy`): those are skipped, with a line naming them."""
    first: dict[str, int] = {}
    repeats = {str(i): first.setdefault(identity, i) for i, identity in enumerate(identities)}
    repeats = {i: j for i, j in repeats.items() if int(i) != j}
    os.environ[REPEATS] = json.dumps(repeats)
    if repeats:
        print(f"sift-train: {len(repeats)} of the sweep's {len(jobs)} jobs would train an earlier job's run again "
              f"and are skipped: " + ", ".join(f"job {i} ({' '.join(jobs[int(i)])}) as job {j}"
                                              for i, j in repeats.items()), file=sys.stderr)


def precheck(args: list[str]) -> list[str]:
    """Compose and validate every job before any runs, so a bad value costs one line, not a sweep. Returns
    overrides to add to the command (see check_launcher)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    if any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in args):
        return []
    check_flag_order(args)
    parsed, _ = get_args_parser().parse_known_args(args)
    overrides = [a for a in parsed.overrides if not a.startswith("hydra")]
    run_dir = next((Path(a.split("=", 1)[1]) for a in parsed.overrides if a.startswith("hydra.run.dir=")), None)
    config_dir = CONF
    if parsed.config_path:  # as Hydra takes it: absolute, or relative to the working directory
        config_dir = Path(parsed.config_path).expanduser().resolve()
    if parsed.config_dir:  # a folder of the user's own configs, searched beside ours
        overrides.append(f"hydra.searchpath=[file://{Path(parsed.config_dir).expanduser().resolve()}]")
    try:
        jobs = _combinations(overrides)
    except HydraException:
        jobs = None  # a sweep syntax this check does not expand (intervals, globs): Hydra reports it
    added = check_launcher(parsed.overrides, parsed.multirun, None if jobs is None else len(jobs))
    if jobs is None:
        return added
    output = override_value(parsed.overrides, "hydra.sweep.dir" if parsed.multirun else "hydra.run.dir")
    os.environ.pop(REPEATS, None)
    keys = [o.split("=", 1)[0] for o in overrides]
    # job numbers as Hydra's basic sweeper gives them: the product of the overrides in their order, each key once
    number_jobs = parsed.multirun and len(set(keys)) == len(keys) and not override_value(parsed.overrides,
                                                                                       "hydra/sweeper")
    identities = []
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            for job in jobs:
                try:
                    cfg = compose(config_name=parsed.config_name or "config", overrides=job, return_hydra_config=True)
                    choices = dict(cfg.hydra.runtime.choices)
                    if output is None:  # the default folder, as this job's config composes it (if it can here)
                        output = OmegaConf.select(cfg, "hydra.sweep.dir" if parsed.multirun else "hydra.run.dir",
                                                  throw_on_resolution_failure=False)
                    with open_dict(cfg):
                        del cfg["hydra"]
                    validate(cfg, choices)
                    if number_jobs:
                        identities.append(training_identity(cfg))
                    if run_dir and not parsed.multirun:  # before Hydra writes .hydra/ into a folder it must refuse
                        check_folder(run_dir, OmegaConf.to_container(cfg, resolve=True), str(cfg.trainer.resume))
                except MissingConfigException as err:  # an unknown choice in a config group
                    group, _, value = (err.missing_cfg_file or "").partition("/")
                    if not err.options:
                        raise ConfigError(_first_lines(err)) from None
                    raise ConfigError(f"{group}={value} is not a known {group}; choose one of: "
                                      f"{', '.join(sorted(err.options))}") from None
                except HydraException as err:
                    raise ConfigError(_override_error(err) or _first_lines(err)) from None
    finally:
        GlobalHydra.instance().clear()
    if number_jobs:
        note_repeats(identities, jobs)
    if output is not None:  # before Hydra makes it: its own failure is a traceback
        can_make(Path(output), "sweep folder (hydra.sweep.dir)" if parsed.multirun else "run folder (hydra.run.dir)")
    return added


def _first_lines(err: Exception) -> str:
    """Hydra's own message, the first two lines (what went wrong, then why) joined into one."""
    text = f"{err}\n{err.__cause__ or ''}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])


def check_same_data(data) -> None:
    """Every process reads the same tokens. Each builds or loads the token folder in data.cache_dir; where that
    folder is not one that every process sees (a node-local disk), each node has its own tokenizer: the same one
    from the same corpus and package versions, but a node's older cache (from before training was deterministic)
    or other versions number the vocabulary differently, and the ranks would train one model on different
    meanings of its ids."""
    seen = distributed.gather((getattr(data, "fingerprint", None), str(getattr(data, "folder", ""))))
    if (other := next((r for r, s in enumerate(seen) if s[0] != seen[0][0]), None)) is not None:
        raise ConfigError(f"the processes read different data: rank {other}'s ({seen[other][1]}) is not rank 0's "
                          f"({seen[0][1]}); set data.cache_dir (or $SIFT_CACHE) to one folder that every process "
                          f"sees, so that one tokenizer serves them all")


def _agree_on_folders() -> None:
    """Under several processes: one folder name for all, rank 0's stamp (`${run_stamp:...}`)."""
    distributed.init()
    if distributed.world() > 1:
        os.environ[STAMP] = distributed.broadcast(_stamp())


def main() -> None:
    if "--version" in sys.argv[1:]:
        print(f"sift-train {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
        return
    warnings.formatwarning = warning_line
    catch_early_interrupts()
    try:
        kill_point("checks", 0)
        add_overrides(sys.argv, precheck(sys.argv[1:]))  # Hydra reads the command line itself
        check_interrupted()
        _agree_on_folders()  # only after every check: a bad value never waits for the other processes
    except ConfigError as err:
        fail(err)
    except KeyboardInterrupt:
        interrupted(BEFORE_ANY_RUN)
    try:
        hydra_main()
    except KeyboardInterrupt:  # in Hydra's own work around a run (composing, making its folder)
        interrupted(" while Hydra prepared a run; finished runs keep their records")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    # `python -m sift_cli.train` (torchrun's module form too): run the importable module's main, whose task
    # function submitit can pickle by reference; this __main__ copy's functions would be pickled by value
    from sift_cli.train import main as importable_main

    importable_main()
