"""What every benchmark report shares: the app's own config composition, the machine, the command."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sift_cli.hardware import cpu_model
from sift_cli.train import CONF

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks"  # not tracked


def report_path(name: str, quick: bool, out: Optional[Path]) -> Path:
    """Where a report goes: --out, else results/NAME.md; a --quick run checks the plumbing and measures nothing
    worth keeping, so it goes to outputs/benchmarks/NAME-quick.md and never rewrites a tracked report."""
    return out or (QUICK_RESULTS / f"{name}-quick.md" if quick else RESULTS / f"{name}.md")


def app_config(overrides: list[str]):
    """The config exactly as `sift-train OVERRIDES` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def machine() -> str:
    """One line naming the hardware and the library versions a figure was measured with."""
    parts = [f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    else:
        parts.append("no GPU")
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}, "
                 f"transformers {transformers.__version__}")
    return "; ".join(parts)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def spread(values: list[float]) -> str:
    """Median with the range over repetitions, e.g. `0.512 [0.498, 0.530]`."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
