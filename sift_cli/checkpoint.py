"""The training state on disk: saved atomically, the newest valid one found, the run folder's identity.

A checkpoint is a folder `checkpoints/step-<N>/` holding `model.pt`, `optimizer.pt` (`scaler.pt` with
fp16) and `state.json`, then `manifest.json` (each file's size and SHA-256), written last. It is assembled
in a temporary folder beside the target, every file fsynced, and renamed into place, then
`checkpoints/latest` names it. A folder without a manifest, or whose files do not match it, is not a
checkpoint: loading warns and falls back to the previous one. What the run folder holds besides
(`run.json`: the resolved config and the W&B run id) decides whether a rerun of a command resumes,
extends, skips or is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from sift_cli import distributed
from sift_cli.config import (DECAYING, RESUMABLE, RESUMABLE_PREFIXES, ConfigError, SelectionConfig, code_defaults,
                             decay_budget, first_line)
from sift_cli.faults import kill_point
from sift_cli.records import COMPLETED, RUNNING, flat_config, run_status, write_atomic

FOLDER, LATEST, MANIFEST, RUN, CLOCK = "checkpoints", "latest", "manifest.json", "run.json", "clock.json"
RECORD_FILES = ("metrics.jsonl", "summary.json", RUN)  # what makes a folder hold a run
BUDGETS = ("trainer.max_steps", "trainer.max_time_s")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int):
        self.folder, self.keep = Path(run_dir) / FOLDER, keep
        self._last_clock_write = 0.0

    def clean(self) -> None:
        """Remove what a kill mid-write left behind: temporary folders, and a replaced checkpoint whose
        replacement is in place (one whose replacement never arrived is put back)."""
        for old in self.folder.glob(".old-step-*"):
            target = self.folder / old.name[len(".old-"):].rsplit("-", 1)[0]
            if not target.exists():
                os.replace(old, target)
        for leftover in self.folder.glob(".*-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, step: int, tensors: dict[str, Any], state: dict) -> Optional[Path]:
        """Write a checkpoint; a failure (disk full, permissions) warns and leaves the previous ones intact."""
        target = self.folder / f"step-{step:09d}"
        tmp = self.folder / f".tmp-step-{step:09d}-{os.getpid()}"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            files = {}
            for name, obj in tensors.items():
                files[f"{name}.pt"] = tmp / f"{name}.pt"
                try:
                    torch.save(obj, files[f"{name}.pt"])
                except RuntimeError as err:  # how torch.save reports a failed write (a full disk: ENOSPC)
                    raise OSError(f"writing {name}.pt failed: {first_line(err)}") from err
            (tmp / "state.json").write_text(json.dumps(state))
            files["state.json"] = tmp / "state.json"
            for path in files.values():
                _fsync(path)
            kill_point("checkpoint-files", step)
            manifest = {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()}
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            kill_point("checkpoint-rename", step)
            if target.exists():  # a second checkpoint at the same step (the final one): replace it
                trash = self.folder / f".old-step-{step:09d}-{os.getpid()}"
                os.replace(target, trash)
                os.replace(tmp, target)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, target)
            _fsync(self.folder)
            write_atomic(self.folder / LATEST, target.name + "\n")
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"checkpoint at step {step} not written ({err}); training goes on, "
                          f"the previous checkpoint stays")
            return None
        for old in sorted(self.folder.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first. By step, not by `latest`: a kill between a rename and the
        pointer's update leaves a newer complete checkpoint that the pointer does not name yet."""
        return sorted(self.folder.glob("step-*"), reverse=True)

    def newest(self) -> Optional[tuple[Path, dict]]:
        """(folder, state) of the newest valid checkpoint; invalid ones warn and are passed over."""
        for folder in self.candidates():
            try:
                return folder, verify(folder)
            except InvalidCheckpoint as err:
                warnings.warn(f"checkpoint {folder} is not valid ({err}); trying the one before it")
        return None

    def write_clock(self, step: int, train_time_s: float, lost_time_s: float, restarts: int,
                    every_s: float = 1.0) -> None:
        """Where the clock stood, about every second: what a kill throws away is known to within one. With it,
        the time lost and the restarts so far, which a checkpoint holds only from the next one on: a process
        killed before then must not take the earlier kills' toll with it."""
        now = time.monotonic()
        if now - self._last_clock_write < every_s:
            return
        self._last_clock_write = now
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            (self.folder / CLOCK).write_text(json.dumps({"step": step, "train_time_s": train_time_s,
                                                         "lost_time_s": lost_time_s, "restarts": restarts}))
        except OSError:
            pass  # the lost time is then reported as 0: a number, not a failed run

    def clock(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / CLOCK).read_text())
        except (OSError, ValueError):
            return None


class InvalidCheckpoint(Exception):
    """A checkpoint folder whose files are missing or do not match its manifest; the message says which."""


def verify(folder: Path) -> dict:
    """A checkpoint's state if its manifest matches its files; InvalidCheckpoint otherwise."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, expected in manifest.items():
            path = folder / name
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                raise ValueError(f"{name} does not match the manifest")
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        raise InvalidCheckpoint(first_line(err)) from None


def load_tensors(folder: Path) -> dict:
    """A verified checkpoint's tensors, read by every process itself (as nanoGPT and torchtitan do) rather
    than sent from rank 0: a BERT-base checkpoint with its optimizer is 1.3 GB. Every process must see the
    run folder, as it must anyway to find its checkpoints after a requeue; where one does not, every
    process stops with the same one-line error."""
    try:
        tensors, error = {p.stem: torch.load(p, map_location="cpu", weights_only=True)
                          for p in sorted(folder.glob("*.pt"))}, None
    except Exception as err:  # whatever one process meets, all must hear of it, or the others wait forever
        tensors, error = None, f"rank {distributed.rank()}: {first_line(err)}"
    errors = [e for e in distributed.gather(error) if e]
    if errors:
        raise ConfigError(f"checkpoint {folder} could not be read by every process ({'; '.join(errors)}); "
                          f"resuming needs the run folder on a file system that every process sees")
    return tensors


# --- the run folder: resume, extend, skip or refuse -------------------------------------------


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ in a way that changes training (budgets and sinks may differ, but not the budget
    a linear or cosine schedule decays over: the rates of the steps already taken would have been others). A
    key the old config lacks (a run saved by a version before the key) differs only where the new value is not
    its default."""
    a, b = flat_config(old), flat_config(new)
    a.update({k: v for k, v in flat_config(code_defaults(new)).items() if k not in a and k in b})
    decays_over = schedule_budget(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and (k == decays_over or (
        k not in RESUMABLE and not k.startswith(RESUMABLE_PREFIXES))))


def decay_note(differ: list[str], new: dict) -> str:
    """Why a changed budget is refused, where it is the one the learning rate decays over."""
    flat = flat_config(new)
    budget = schedule_budget(flat)
    if budget not in differ:
        return ""
    if flat["trainer.scheduler"] in DECAYING:
        return f" (trainer.scheduler={flat['trainer.scheduler']} decays the learning rate over {budget})"
    return f" (selection.start and selection.end are fractions of {budget})"


def schedule_budget(flat: dict) -> Optional[str]:
    """The budget a run's schedules (decaying learning rate, selection window) run their course over, from its
    flat config (a run saved before the selection window has none)."""
    window = {k: flat[f"selection.{k}"] for k in ("start", "end") if f"selection.{k}" in flat}
    return decay_budget(flat.get("trainer.scheduler"), flat.get("trainer.schedule_unit"),
                        SelectionConfig.windowed(window))


def _budget(value) -> float:
    return float("inf") if value is None else float(value)


def extends(old: dict, new: dict) -> bool:
    """Whether the new config raises a budget of the old, so a finished run trains on."""
    a, b = flat_config(old), flat_config(new)
    return any(_budget(b.get(k)) > _budget(a.get(k)) for k in BUDGETS)


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / f).exists() for f in RECORD_FILES)


def read_run(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / RUN).read_text())
    except (OSError, ValueError):
        return None


def check_folder(run_dir: Path, config: dict, resume: str) -> str:
    """What to do with this run folder: `new`, `resume`, `done` (completed, nothing to add). Or refuse."""
    run_dir = Path(run_dir)
    if resume not in ("auto", "never"):
        return "resume"  # a checkpoint path: its folder is checked when it is loaded
    if not holds_run(run_dir):
        return "new"
    if resume == "never":
        raise ConfigError(f"the run folder {run_dir} already holds a run and trainer.resume=never; choose a new "
                          f"folder (hydra.run.dir=..., or hydra.sweep.dir=... under --multirun), or "
                          f"trainer.resume=auto to continue that run")
    previous = read_run(run_dir)
    if not isinstance(previous, dict) or not isinstance(previous.get("config"), dict):
        raise ConfigError(f"the run folder {run_dir} holds records of a run that cannot be resumed (no {RUN}); "
                          f"choose a new folder with hydra.run.dir=... (or hydra.sweep.dir=...)")
    differ = changed_keys(previous["config"], config)
    if differ:
        old, new = flat_config(previous["config"]), flat_config(config)
        shown = ", ".join(f"{k} ({old.get(k)} -> {new.get(k)})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(f"the run folder {run_dir} holds a run with another config: {shown}{more}"
                          f"{decay_note(differ, config)}; rerun with its values to resume it, or choose a new "
                          f"folder (hydra.run.dir=... / hydra.sweep.dir=...)")
    if run_status(run_dir) == COMPLETED and not extends(previous["config"], config):
        return "done"
    return "resume"


def check_data(folder: Path, state: dict, fingerprint: Optional[str]) -> None:
    """A checkpoint goes on only with the data it was trained on: its token ids must mean the same word pieces.
    A checkpoint written before checkpoints held the data's fingerprint goes on with a warning; data without a
    fingerprint (images) is not checked."""
    if fingerprint is None:
        return
    if "data_fingerprint" not in state:
        warnings.warn(f"checkpoint {folder} predates data fingerprints: resuming on data {fingerprint} without "
                      f"checking that it was trained on the same")
    elif state["data_fingerprint"] != fingerprint:
        raise ConfigError(f"checkpoint {folder} was trained on data {state['data_fingerprint']}, this run reads "
                          f"data {fingerprint}: its token cache was rebuilt with another vocabulary (another "
                          f"data.cache_dir, an older sift-train), the corpus changed or a package version changed "
                          f"the text; resume it with its own data, or train in a new folder")


def check_lost(run_dir: Path) -> None:
    """A run that reached a checkpoint (completed, interrupted, preempted) but has none left (checkpoints/
    removed) cannot go on: training it again from step 0 would overwrite its records. A run killed before its
    first checkpoint (still `running`) starts over, as it never saved anything to continue from."""
    status = run_status(run_dir)
    if status not in (None, RUNNING):
        raise ConfigError(f"the run folder {run_dir} holds a {status} run but no checkpoint to continue it from "
                          f"({Path(run_dir) / FOLDER} was removed); train in a new folder (hydra.run.dir=..., "
                          f"or hydra.sweep.dir=...) to start it over")
