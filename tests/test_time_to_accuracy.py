"""benchmarks/time_to_accuracy.py at a tiny size: the race a lent GPU runs (benchmarks/gpu.sh) launches every
arm through the CLI, reads its folders back and writes a complete report, and a second call with one seed
more keeps the finished runs, also without their weights (as a clone of a committed race has them); a longer
budget trains them on."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_accuracy  # noqa: E402


def test_the_race_reports_every_arm_and_a_second_call_adds_a_seed(corpus_file, tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "report.md"
    tiny = [f"data.paths=[{corpus_file}]", "data.vocab_size=200", "data.seq_len=32", "data.val_fraction=0.2",
            "data.max_val_samples=16", "model=bert_tiny", "trainer.batch_size=8", "trainer.max_time_s=1",
            "trainer.eval_every_s=0.5", "trainer.device=cpu", "trainer.compile=false"]

    def race(seeds: str) -> str:
        monkeypatch.setattr(sys, "argv", [
            "time_to_accuracy.py", "--experiment", "tta_gpu", "--arms", "vanilla,sift-loss", "--lrs", "1e-3",
            "--seeds", seeds, "--runs-dir", str(runs), "--plots", str(tmp_path / "plots"), "--out", str(out), *tiny])
        time_to_accuracy.main()
        return out.read_text()

    first = race("0")
    finished = {p: p.stat().st_mtime for p in runs.glob("main/*/summary.json")}
    assert sorted(p.parent.name for p in finished) == ["sift-loss-lr0.001-s0", "vanilla-lr0.001-s0"]
    comparison = first.split("## Comparison")[1]
    for arm in ("vanilla", "sift-loss"):
        row = next(line for line in comparison.splitlines() if line.startswith(f"| {arm} | 0.001 | "))
        assert int(row.split("|")[3].split()[0]) > 0, row  # the median steps the arm trained
        assert float(row.split("|")[6].split()[0]) > 0, row  # and how many times it read the data
    assert "**Per sample back-propagated**" in first and "**Per second**" in first
    assert "## The same runs read by sift-compare" in first and (tmp_path / "plots" / "accuracy_vs_time.png").exists()

    # a clone of the committed race has the records without the weights (.gitignore): they are finished runs
    weights = [*runs.glob("main/*-s0/checkpoints"), *runs.glob("main/*-s0/hf")]
    assert len(weights) == 4
    for folder in weights:
        shutil.rmtree(folder)
    second = race("0,1")
    assert "Seeds 0, 1;" in second and len(list(runs.glob("main/*/summary.json"))) == 4
    assert all(p.stat().st_mtime == mtime for p, mtime in finished.items())  # seed 0 was not run again

    # a longer budget trains the finished runs on (sift-train extends them), keeping their first logs
    logs = {p: p.read_text() for p in runs.glob("main/*-s1.log")}
    tiny[tiny.index("trainer.max_time_s=1")] = "trainer.max_time_s=2"
    race("1")
    for summary in runs.glob("main/*-s1/summary.json"):
        run = json.loads(summary.read_text())
        assert run["status"] == "completed" and run["restarts"] == 1 and run["train_time_s"] >= 2
    assert len(logs) == 2 and all(p.read_text().startswith(text) and len(p.read_text()) > len(text)
                                  for p, text in logs.items())
