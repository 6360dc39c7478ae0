"""benchmarks/step_cost.py at a tiny size: the instrument a lent GPU runs once must run, and its floor must be
the arithmetic of its own FLOP counts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402


def tables(report: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table of the report, each as {first cell: {column: cell}}."""
    found = []
    for block in re.findall(r"(?:^\|.*\n?)+", report, re.M):
        lines = [[c.strip() for c in line.strip("|").split("|")] for line in block.strip().splitlines()]
        found.append({cells[0]: dict(zip(lines[0], cells)) for cells in lines[2:]})
    return found


def test_step_cost_reports_every_arm_with_its_flop_floor_and_diagnostics(corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "step_cost.md"
    data = ["data=text_files", f"data.paths=[{corpus_file}]", "data.vocab_size=200", "data.val_fraction=0.2"]
    monkeypatch.setattr(sys, "argv", [
        "step_cost.py", "--model", "bert_tiny:4x32", "--exits", "1", "--fracs", "0.5", "--reps", "1", "--warmup", "1",
        "--steps", "2", "--max-profiles", "0", "--diagnose", "--device", "cpu", "--out", str(out),
        *[arg for override in data for arg in ("--set", override)]])
    step_cost.main()
    report = out.read_text()
    rows, targets = tables(report)
    assert list(rows) == ["vanilla", "minimal", "textbook", "random f=0.5", "sift k=1 f=0.5"]
    for arm, row in rows.items():
        assert float(row["ms/step"].split()[0]) > 0, arm
    scoring = float(re.search(r"scoring pass: k=1 [\d.]+ GFLOP \(([\d.]+) of vanilla\)", report).group(1))
    assert 0 < scoring < 1
    sift, random, vanilla = rows["sift k=1 f=0.5"], rows["random f=0.5"], rows["vanilla"]
    assert float(sift["FLOP floor"]) == pytest.approx(scoring + 0.5, abs=2e-3)  # counted: scoring pass + frac
    assert float(sift["k/(3L)+frac"]) == pytest.approx(1 / 6 + 0.5, abs=1e-3)  # bert_tiny: L=2
    assert (random["FLOP floor"], vanilla["FLOP floor"], vanilla["t / t_vanilla"].split()[0]) == ("0.500", "1.000",
                                                                                                  "1.000")
    # the diagnostics ran on the step prepare_step builds (on a CPU: no CUDA kernels, no sync counter)
    assert sift["host syncs/step"] == "-" and sift["compile s"] == "-"
    for arm in ("vanilla", "random f=0.5", "sift k=1 f=0.5"):  # the same seed, the same mask; another, another
        assert rows[arm]["dropout per step"] == "varies", arm
    ops = {arm: [int(n.replace(",", "")) for n in re.findall(r"[\d,]+", rows[arm]["aten ops/step"])]
           for arm in ("vanilla", "random f=0.5", "sift k=1 f=0.5")}
    assert all(0 < views < total for total, views in ops.values())
    assert ops["sift k=1 f=0.5"][0] > ops["random f=0.5"][0]  # the scoring pass, which random does not run
    assert "Fixed cost per step" in report
    # issue 14's targets, read from the same medians: on a CPU no MFU and no sync counter
    eager = targets["eager"]
    excess = next(v for k, v in eager.items() if k.startswith("sift k=1 f=0.5 measured/floor")).split()
    assert float(excess[0]) == pytest.approx(float(sift["measured/floor"].split()[0]), abs=0.01)
    assert excess[1] == ("met" if float(excess[0]) <= 1.10 else "NOT")
    assert [v for k, v in eager.items() if k.startswith(("vanilla MFU", "host syncs"))] == ["n/a", "n/a"]
