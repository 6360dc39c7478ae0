"""sift-compare on real sift-train runs: the table's numbers against the records, plots, bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

import matplotlib.image
import pytest

from conftest import sift_train, tiny_overrides


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, corpus_file) -> Path:
    """8 runs of 6 steps: vanilla twice per seed (frac=1.0 ignores the criterion), sift-loss and random,
    each probing its exit layers every 2 steps."""
    root = tmp_path_factory.mktemp("sweep")
    result = sift_train(
        "--multirun", "frac=0.5,1.0", "criterion=loss,random", "seed=0,1",
        *tiny_overrides(corpus_file, "trainer.warmup_steps=0", "trainer.optimizer.lr=3e-3",
                        "diagnostics.every_n_steps=2"),
        f"hydra.sweep.dir={root}",
    )
    assert result.returncode == 0, result.stderr
    return root


def sift_compare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sift_cli.compare", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def records(root: Path) -> dict[str, list[tuple[dict, list[dict]]]]:
    """(summary, metrics rows) of every run, by method: this sweep has one setting, so a method is a group."""
    runs: dict[str, list] = {}
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        runs.setdefault(summary["method"], []).append((summary, rows))
    return runs


def first_time(rows: list[dict], target: float):
    for row in rows:
        if row["val_acc"] >= target:
            return row["train_time_s"]
    return None


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def number(cell: str):
    return float(cell) if cell else None


def test_table_numbers_match_the_records(sweep, tmp_path):
    runs = records(sweep)
    assert sorted(runs) == ["random", "sift-loss", "vanilla"] and len(runs["vanilla"]) == 4
    bests = [s["best_val_acc"] for group in runs.values() for s, _ in group]
    starts = [rows[0]["val_acc"] for group in runs.values() for _, rows in group]
    everyone = min(bests)  # reached by every run
    assert everyone > max(starts), "the tiny runs did not learn; the speedup would be 0/0"
    some = max(bests)  # reached by the best run(s) only
    unreachable = 1.0
    table, markdown = tmp_path / "table.csv", tmp_path / "table.md"

    result = sift_compare(sweep, "--target", everyone, "--target", some, "--target", unreachable,
                          "--csv", table, "--markdown", markdown, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    assert "seed 0, 1 ran more than once" in result.stderr  # vanilla under both criteria

    rows = read_csv(table)
    vanilla_times = [first_time(r, everyone) for _, r in runs["vanilla"]]
    for method, group in runs.items():
        row = rows[method]
        finals, group_bests = [s["final_val_acc"] for s, _ in group], [s["best_val_acc"] for s, _ in group]
        assert (int(row["runs"]), int(row["seeds"])) == (len(group), 2)
        assert number(row["final_acc_mean"]) == pytest.approx(mean(finals))
        assert number(row["final_acc_std"]) == pytest.approx(stdev(finals))
        assert number(row["best_acc_mean"]) == pytest.approx(mean(group_bests))

        times = [first_time(r, everyone) for _, r in group]
        assert int(row[f"reached_{everyone:g}"]) == len(group)
        assert number(row[f"time_to_{everyone:g}_mean"]) == pytest.approx(mean(times))
        assert number(row[f"time_to_{everyone:g}_std"]) == pytest.approx(stdev(times))
        if method == "vanilla":
            assert number(row[f"speedup_{everyone:g}"]) == 1.0
        else:
            speedup = mean(vanilla_times) / mean(times)
            spread = speedup * math.hypot(stdev(vanilla_times) / mean(vanilla_times), stdev(times) / mean(times))
            assert number(row[f"speedup_{everyone:g}"]) == pytest.approx(speedup)
            assert number(row[f"speedup_{everyone:g}_std"]) == pytest.approx(spread)

        reached_some = sum(first_time(r, some) is not None for _, r in group)
        assert int(row[f"reached_{some:g}"]) == reached_some
        assert (row[f"time_to_{some:g}_mean"] == "") == (reached_some < len(group))
        assert int(row[f"reached_{unreachable:g}"]) == 0
        assert row[f"time_to_{unreachable:g}_mean"] == row[f"speedup_{unreachable:g}"] == ""

    lines = markdown.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    by_method = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert by_method["vanilla"][header.index("seeds")] == "2 (4 runs)"
    assert by_method["sift-loss"][header.index("exit layer")] == "1"
    assert by_method["random"][header.index("exit layer")] == "—"  # random selection has no exit
    assert all(cells[header.index(f"time to {unreachable:g}")] == "not reached" for cells in by_method.values())
    for method, cells in by_method.items():
        reached_some = int(rows[method][f"reached_{some:g}"])
        if reached_some < int(rows[method]["runs"]):
            expected = f"{reached_some}/{rows[method]['runs']} reached" if reached_some else "not reached"
            assert cells[header.index(f"time to {some:g}")] == expected


def test_default_targets_follow_vanilla(sweep, tmp_path):
    result = sift_compare(sweep, "--csv", tmp_path / "table.csv", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    vanilla_best = mean(s["best_val_acc"] for s, _ in records(sweep)["vanilla"])
    expected = {math.floor(vanilla_best * share * 1e4) / 1e4 for share in (0.90, 0.95, 0.99)}
    columns = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert {float(c.removeprefix("reached_")) for c in columns if c.startswith("reached_")} == expected
    assert f"{vanilla_best:.4f}" in result.stdout


def read_png(path: Path):
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0
    return image


def test_plots_are_images(sweep, tmp_path):
    result = sift_compare(sweep, "--target", 0.3, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    read_png(tmp_path / "accuracy_vs_time.png")
    read_png(tmp_path / "accuracy_vs_samples.png")
    # every group probed its exits, and sift-loss logged its kept and dropped scores: 3 groups x 3 panels
    height, width = read_png(tmp_path / "diagnostics.png").shape[:2]
    assert width / height == pytest.approx((3 * 4.2) / (3 * 3), rel=0.02)


def test_diagnostics_plot_from_written_probes(sweep, tmp_path):
    """Vanilla runs (no kept/dropped scores) with diagnostics.jsonl as the trainer writes it."""
    folders = [one_run(sweep, tmp_path / "runs", "vanilla", i) for i in (0, 1)]
    for folder in folders:
        (folder / "diagnostics.jsonl").unlink()
    result = sift_compare(tmp_path / "runs", "--target", 0.3, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "diagnostics.png").exists()  # nothing to plot

    for folder in folders:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        probes = [{"step": r["step"], "train_time_s": r["train_time_s"], "spearman_k1": 0.5 + 0.1 * i,
                   "overlap_k1": 0.4 + 0.1 * i, "spearman_k2": 1.0, "overlap_k2": 1.0} for i, r in enumerate(rows)]
        (folder / "diagnostics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    with open(folders[1] / "diagnostics.jsonl", "a") as f:
        f.write("{not json\n")
    result = sift_compare(tmp_path / "runs", "--target", 0.3, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    bad_line = len((folders[1] / "diagnostics.jsonl").read_text().splitlines())
    assert f"diagnostics.jsonl:{bad_line} is not a JSON line" in result.stderr
    # one group, spearman and overlap, no score panel
    height, width = read_png(tmp_path / "diagnostics.png").shape[:2]
    assert width / height == pytest.approx((2 * 4.2) / 3, rel=0.02)


def one_run(sweep: Path, dest: Path, method: str = "vanilla", index: int = 0) -> Path:
    source = Path(records(sweep)[method][index][0]["run_dir"])
    return Path(shutil.copytree(source, dest / source.name))


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_paths(tmp_path):
    assert "does not exist" in error_line(sift_compare(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no runs under" in error_line(sift_compare(tmp_path / "empty"))


def test_bad_target(sweep):
    assert "(0, 1]" in error_line(sift_compare(sweep, "--target", "1.5"))


def test_mixed_tasks(sweep, tmp_path):
    one_run(sweep, tmp_path)
    image = one_run(sweep, tmp_path, "sift-loss")
    summary = json.loads((image / "summary.json").read_text())
    (image / "summary.json").write_text(json.dumps({**summary, "task": "image"}))
    line = error_line(sift_compare(tmp_path))
    assert "different tasks" in line and "mlm" in line and "image" in line


def test_corrupt_and_unfinished_runs_are_skipped(sweep, tmp_path):
    one_run(sweep, tmp_path)
    corrupt = one_run(sweep, tmp_path, "sift-loss", 0)
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "val_a\n')
    unfinished = one_run(sweep, tmp_path, "sift-loss", 1)
    (unfinished / "summary.json").unlink()
    result = sift_compare(tmp_path, "--target", 0.3, "--csv", tmp_path / "table.csv", "--out", tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    warnings = result.stderr.strip().splitlines()
    metrics_lines = len((corrupt / "metrics.jsonl").read_text().splitlines())
    assert any(f"skipping {corrupt}" in w and f"metrics.jsonl:{metrics_lines}" in w for w in warnings)
    assert any(f"skipping {unfinished}" in w and "no summary.json" in w for w in warnings)
    assert list(read_csv(tmp_path / "table.csv")) == ["vanilla"]  # only the good run is left

    # nothing left to compare: the warning, then one error line
    result = sift_compare(corrupt)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sift-compare: error: no complete runs")


def test_arms_tuned_to_their_own_learning_rate_compare_with_tuned_flag(sweep, tmp_path):
    """A per-arm rate makes separate settings, so no speedup; --tuned KEY compares across it."""
    root = tmp_path / "tuned"
    for folder in sweep.iterdir():
        if (folder / "summary.json").exists():
            shutil.copytree(folder, root / folder.name)
            summary = json.loads((root / folder.name / "summary.json").read_text())
            if summary["method"] != "vanilla":
                summary["config"]["trainer"]["optimizer"]["lr"] = 0.01
                (root / folder.name / "summary.json").write_text(json.dumps(summary))
    target = min(json.loads(p.read_text())["best_val_acc"] for p in root.glob("*/summary.json"))
    plain, tuned = tmp_path / "plain.csv", tmp_path / "tuned.csv"
    assert sift_compare(root, "--target", target, "--csv", plain).returncode == 0
    assert sift_compare(root, "--target", target, "--csv", tuned, "--tuned", "trainer.optimizer.lr").returncode == 0
    assert read_csv(plain)["sift-loss"][f"speedup_{target:g}"] == ""  # no vanilla at lr 0.01
    assert number(read_csv(tuned)["sift-loss"][f"speedup_{target:g}"]) > 0
