"""The run record: metrics.jsonl and summary.json in the run folder, and W&B behind the same calls.

The local files are written first and always; W&B gets the very same dicts. A W&B failure costs a
warning, never a record. sift-compare reads these files back with `read_metrics`.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

log = logging.getLogger(__name__)
METRICS, SUMMARY, DIAGNOSTICS = "metrics.jsonl", "summary.json", "diagnostics.jsonl"


def read_metrics(run_dir: Path, file: str = METRICS) -> list[dict]:
    """Rows of a run's metrics.jsonl (or another JSON-lines record). Raises ValueError naming a corrupt line."""
    path = Path(run_dir) / file
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not a JSON line") from None
    return rows


def time_to_target(rows: list[dict], target: float) -> Optional[dict]:
    """The first evaluation that reached `target` validation accuracy, or None if none did."""
    return next((r for r in rows if r["val_acc"] >= target), None)


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


class Recorder:
    def __init__(self, run_dir: Path, logger_cfg: Any, config: dict, name: str, group: Optional[str],
                 job_type: str, tags: list[str]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._files: dict = {}
        self.wandb = None
        if logger_cfg.backend == "wandb":
            self._init_wandb(logger_cfg, config, name, group, job_type, tags)

    def _init_wandb(self, cfg, config, name, group, job_type, tags) -> None:
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return
        try:
            import wandb

            self.wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=mode, name=name, group=group, job_type=job_type,
                tags=list(tags), config=config, dir=cfg.dir or os.environ.get("WANDB_DIR") or str(self.run_dir),
                reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"),
            )
            self.wandb.define_metric("train_time_s")
            for key in ("val_*", "train_loss", "lr", "samples_*", "step", "score_*", "spearman_*", "overlap_*"):
                self.wandb.define_metric(key, step_metric="train_time_s")
            self.wandb.define_metric("val_acc", step_metric="train_time_s", summary="max,last")
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
        if file not in self._files:
            self._files[file] = open(self.run_dir / file, "a", buffering=1)  # line-buffered: a crash keeps rows
        self._files[file].write(json.dumps(row) + "\n")
        self._to_wandb(lambda r: self.wandb.log(r), row)

    def finish(self, summary: dict) -> None:
        for f in self._files.values():
            f.close()
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        flat.update(summary.get("targets", {}))
        self._to_wandb(lambda s: self.wandb.summary.update(s), flat)
        if self.wandb is not None:
            offline = self.wandb.settings.mode == "offline"
            where = self.wandb.dir
            self._to_wandb(lambda: self.wandb.finish())
            if offline:
                log.info("W&B run saved offline in %s; upload it later with: wandb sync %s", where, Path(where).parent)
