"""The run record: metrics.jsonl and summary.json in the run folder, and W&B behind the same calls.

The local files are written first and always; W&B gets the very same dicts. A W&B failure costs a
warning, never a record. sift-compare reads these files back with `read_metrics`. summary.json is
written at every evaluation with status `running`, and at the end with the run's final status, so a run
in progress, or one killed before its end, can be read like a finished one.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from sift_cli.faults import armed, kill_point

log = logging.getLogger(__name__)
METRICS, SUMMARY, DIAGNOSTICS = "metrics.jsonl", "summary.json", "diagnostics.jsonl"
RUNNING, COMPLETED = "running", "completed"  # statuses of summary.json (also interrupted, preempted)


def run_status(run_dir: Path) -> Optional[str]:
    """The status in a run folder's summary.json, or None where it has none (or an unreadable one)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text()).get("status")
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: Path, file: str = METRICS) -> list[dict]:
    """Rows of a run's metrics.jsonl (or another JSON-lines record). A last line cut short (no newline after
    it: a process killed while writing it) is left out; any other line that is not JSON raises ValueError."""
    path = Path(run_dir) / file
    text = path.read_text()
    lines, rows = text.splitlines(), []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) and not text.endswith("\n"):
                    break  # torn
                raise ValueError(f"{path}:{number} is not a JSON line") from None
    return rows


def flat_config(config: dict, prefix: str = "") -> dict:
    """A run's nested config as dotted keys (`trainer.batch_size`), lists as JSON text so values compare and hash."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def schedule_parts(start: float, end: float, every: int) -> list[str]:
    """A selection schedule in words, for run names and arm labels: the window, one step in `every` (nothing
    for the default, every step of the run)."""
    return ([f"{start:g}-{end:g}"] if (start, end) != (0, 1) else []) + ([f"/{every}"] if every > 1 else [])


def time_to_target(rows: list[dict], target: float) -> Optional[dict]:
    """The first evaluation that reached `target` validation accuracy, or None if none did.

    Its `train_time_s`, `step` and `samples_backpropagated` are interpolated linearly between it and the
    evaluation before, so that the time does not depend on how often a run was evaluated; the first
    evaluation, having none before it, is returned as it is."""
    previous = None
    for row in rows:
        if row["val_acc"] >= target:
            if previous is None:
                return row
            share = (target - previous["val_acc"]) / (row["val_acc"] - previous["val_acc"])
            return {**row, **{k: previous[k] + share * (row[k] - previous[k])
                              for k in ("train_time_s", "step", "samples_backpropagated") if k in row}}
        previous = row
    return None


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set, online with credentials, offline otherwise."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file whole: a reader sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Recorder:
    """Appends rows to the run folder's JSON-lines records and sends the same rows to W&B.

    `positions` (file -> byte offset) are where a resumed run's records end: anything a killed process
    wrote after its last checkpoint is cut off there (a torn last line too) and written again by the
    resumed run, identically. W&B gets each row once, at its training step: a resumed W&B run starts after
    the last step it holds, and is sent the local rows from there (a killed process's W&B data is lost
    past its last upload; offline, W&B cannot resume, and each fragment is sent the whole record). Only
    the main process of a distributed run records (`enabled`); the others keep their rows in memory.
    """

    def __init__(self, run_dir: Path, logger_cfg: Any, config: dict, name: str, group: Optional[str],
                 job_type: str, tags: list[str], wandb_id: Optional[str] = None,
                 positions: Optional[dict] = None, enabled: bool = True, about: Optional[dict] = None,
                 targets: Sequence[float] = ()):
        self.run_dir, self.enabled, self.config = Path(run_dir), enabled, config
        self.about, self.targets = about or {}, list(targets)  # what summary.json says besides the totals
        self.rows: list[dict] = []
        self._files: dict = {}
        self._wandb_from = 0  # the first step the W&B run lacks
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for file in (METRICS, DIAGNOSTICS):
            path, offset = self.run_dir / file, (positions or {}).get(file, 0)
            if path.exists():
                with open(path, "r+b") as f:
                    f.truncate(offset)
        if (self.run_dir / METRICS).exists():
            self.rows = read_metrics(self.run_dir)
        if logger_cfg.backend == "wandb":
            self._init_wandb(logger_cfg, name, group, job_type, tags, wandb_id)
            diagnostics = read_metrics(self.run_dir, DIAGNOSTICS) if (self.run_dir / DIAGNOSTICS).exists() else []
            for row in sorted(diagnostics + self.rows, key=lambda r: r["step"]):  # a step's diagnostics first
                self._send(row)

    def _init_wandb(self, cfg, name, group, job_type, tags, wandb_id) -> None:
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return
        try:
            import wandb

            self.wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=mode, name=name, group=group, job_type=job_type,
                tags=list(tags), config=self.config, dir=cfg.dir or os.environ.get("WANDB_DIR") or str(self.run_dir),
                id=wandb_id, resume="allow",  # a resumed run continues its W&B run
                reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"),
            )
            self.wandb.define_metric("train_time_s")
            for key in ("val_*", "train_loss", "lr", "samples_*", "step", "score_*", "spearman_*", "overlap_*",
                        "tflops", "mfu", "data_time_s", "loss_scale"):
                self.wandb.define_metric(key, step_metric="train_time_s")
            self.wandb.define_metric("val_acc", step_metric="train_time_s", summary="max,last")
            self._wandb_from = self.wandb.starting_step
        except Exception as err:  # W&B is a sink: it never stops training
            warnings.warn(f"W&B could not start ({err}); the local record in {self.run_dir} stays complete")
            self.wandb = None

    def _to_wandb(self, call, *args) -> None:
        if self.wandb is None:
            return
        try:
            call(*args)
        except Exception as err:
            warnings.warn(f"W&B stopped logging ({err}); the local record in {self.run_dir} stays complete")
            self.wandb = None

    def log(self, row: dict, file: str = METRICS) -> None:
        """One row to a JSON-lines file of the run folder (metrics by default), and the same row to W&B."""
        if file == METRICS:
            self.rows.append(row)
        if not self.enabled:
            return
        if file not in self._files:
            self._files[file] = open(self.run_dir / file, "a", buffering=1)  # line-buffered: a crash keeps rows
        line = json.dumps(row) + "\n"
        if armed("metrics-line", row.get("step")):
            self._files[file].write(line[: len(line) // 2])  # a torn line, as a kill mid-write leaves it
            self._files[file].flush()
            kill_point("metrics-line", row.get("step"))
        self._files[file].write(line)
        self._send(row)

    def _send(self, row: dict) -> None:
        if row["step"] >= self._wandb_from:
            self._to_wandb(lambda r: self.wandb.log(r, step=r["step"]), row)

    def positions(self) -> dict:
        """Where each record ends now, made durable: what a checkpoint remembers."""
        out = {}
        for file in (METRICS, DIAGNOSTICS):
            f = self._files.get(file)
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                out[file] = f.tell()
            else:
                path = self.run_dir / file
                out[file] = path.stat().st_size if path.exists() else 0
        return out

    def summary(self, totals: dict) -> dict:
        """summary.json: the run's totals (status first), time and steps to each target, what the run is and its
        resolved config."""
        targets = {}
        for target in self.targets:
            hit = time_to_target(self.rows, target)
            targets[f"time_to_target/{target:g}"] = hit["train_time_s"] if hit else None
            targets[f"steps_to_target/{target:g}"] = hit["step"] if hit else None
        return {**totals, "targets": targets, **self.about, "config": self.config}

    def progress(self, totals: dict) -> None:
        """summary.json of a run still training (status running), after each evaluation: read back, a run in
        progress or killed without a chance to finish its record is one that did not complete."""
        if self.enabled:
            write_atomic(self.run_dir / SUMMARY, json.dumps(self.summary(totals), indent=2) + "\n")

    def finish(self, totals: dict) -> dict:
        """The final summary.json (and W&B's summary); returns it."""
        summary = self.summary(totals)
        for f in self._files.values():
            f.close()
        self._files = {}
        if not self.enabled:
            return summary
        write_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        flat.update(summary.get("targets", {}))
        self._to_wandb(lambda s: self.wandb.summary.update(s), flat)
        if self.wandb is not None:
            offline = self.wandb.settings.mode == "offline"
            folder = Path(self.wandb.dir).parent  # the offline-run-... folder, not its files/
            if summary.get("status") == "preempted":
                self._to_wandb(lambda: self.wandb.mark_preempting())
            self._to_wandb(lambda: self.wandb.finish(exit_code=0 if summary.get("status") == COMPLETED else 1))
            if offline:
                log.info("W&B run saved offline; upload it later with: wandb sync %s (it holds the whole run: a "
                         "resumed run's earlier offline folders need no upload)", shlex.quote(str(folder)))
        return summary
