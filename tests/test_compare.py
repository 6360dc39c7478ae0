"""sift-compare on run folders written by hand, as sift-train writes them: the table's numbers against the
records, fair grouping, the terminal table at 80 columns, plots, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import mean, median, stdev
from typing import Optional

import matplotlib.image
import pytest
from scipy.stats import ttest_ind
from rich.console import Console

from sift_cli.compare import compare, main, parse_args
from sift_cli.records import time_to_target

BATCH = 8


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_run(folder: Path, accs: list[float], times: Optional[list[float]] = None, *, method: str = "vanilla",
              seed: int = 0, frac: float = 1.0, criterion: str = "loss", exit_layer: int = 1,
              status: str = "completed", config: Optional[dict] = None, summary: Optional[dict] = None,
              scores: bool = False, probes: Optional[list[dict]] = None) -> Path:
    """A run folder as sift-train leaves it: metrics.jsonl (one row per evaluation, every 10 steps) and
    summary.json (with the resolved config), and diagnostics.jsonl when given probes."""
    times = times if times is not None else [float(i) for i in range(len(accs))]
    rows = []
    for i, (acc, time) in enumerate(zip(accs, times)):
        step = 10 * i
        row = {"step": step, "train_time_s": time, "wall_time_s": 1.5 * time, "samples_seen": step * BATCH,
               "samples_backpropagated": math.ceil(frac * BATCH) * step, "val_acc": acc, "val_loss": 5 - acc,
               "train_loss": None if i == 0 else 5.2 - acc, "lr": 1e-3}
        if scores and i:
            row.update(score_kept=4.0 - acc, score_dropped=3.0 - acc)
        rows.append(row)
    cfg = merged({
        "model": {"_target_": "sift_cli.models.bert.BertMLM", "num_layers": 2, "hidden_size": 128},
        "data": {"_target_": "sift_cli.data.text.text_files", "paths": ["corpus.txt"], "seq_len": 32,
                 "duplicate_fraction": 0.0, "duplicate_pool": None, "noise_fraction": 0.0, "cache_dir": None},
        "trainer": {"batch_size": BATCH, "batch_mode": "scored", "selection_scope": "global", "max_steps": 100,
                    "max_time_s": None, "eval_every_steps": 10, "optimizer": {"lr": 1e-3}, "compile": False,
                    "device": "auto", "progress": "auto", "resume": None, "checkpoint_every_s": 600},
        "logger": {"backend": "none"}, "diagnostics": {"every_n_steps": None},
        "exit_layer": exit_layer, "frac": frac, "criterion": criterion, "seed": seed, "name": None, "tags": [],
        "targets": []}, config or {})
    record = merged({
        "method": method, "run_name": f"{method}-s{seed}", "task": "mlm", "model": "bert_tiny",
        "data": "text_files", "depth": 2, "exit_layer": exit_layer, "frac": frac, "criterion": criterion,
        "seed": seed, "device": "cpu", "accelerator": "Test CPU", "world_size": 1, "status": status, "restarts": 0,
        "steps": rows[-1]["step"], "train_time_s": times[-1], "final_val_acc": accs[-1], "best_val_acc": max(accs),
        "final_val_loss": rows[-1]["val_loss"],
        "targets": {}, "run_dir": str(folder), "config": cfg}, summary or {})
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps(record, indent=2))
    if probes is not None:
        (folder / "diagnostics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    return folder


def sift(folder: Path, accs: list[float], times: Optional[list[float]] = None, **kwargs) -> Path:
    return write_run(folder, accs, times, method="sift-loss", frac=0.5, **kwargs)


def sift_compare(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sift-compare ARGS`, in this process: quicker than a subprocess."""
    capsys.readouterr()
    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def markdown_rows(path: Path) -> dict[str, dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def number(cell: str):
    return float(cell) if cell else None


def interpolated(accs: list[float], times: list[float], target: float) -> Optional[float]:
    """The test's own reading: the time where the straight line between the first evaluation at or above
    the target and the one before crosses the target."""
    i = next((i for i, a in enumerate(accs) if a >= target), None)
    if i is None or i == 0:
        return None if i is None else times[0]
    return times[i - 1] + (target - accs[i - 1]) / (accs[i] - accs[i - 1]) * (times[i] - times[i - 1])


# ---------------------------------------------------------------------------------------------


def test_time_to_target_interpolates_between_evaluations():
    rows = [{"step": 0, "train_time_s": 0.0, "samples_backpropagated": 0, "val_acc": 0.1, "val_loss": 4.0},
            {"step": 10, "train_time_s": 4.0, "samples_backpropagated": 40, "val_acc": 0.3, "val_loss": 3.0},
            {"step": 20, "train_time_s": 8.0, "samples_backpropagated": 80, "val_acc": 0.7, "val_loss": 2.0}]
    hit = time_to_target(rows, 0.4)  # a quarter of the way from 0.3 to 0.7
    assert hit == {"step": 12.5, "train_time_s": 5.0, "samples_backpropagated": 50.0, "val_acc": 0.7, "val_loss": 2.0}
    assert time_to_target(rows, 0.3) == rows[1]  # reached exactly at an evaluation
    assert time_to_target(rows, 0.05) == rows[0]  # the first evaluation has none before it
    assert time_to_target(rows, 0.71) is None


def test_table_numbers_match_the_records(tmp_path, capsys):
    """vanilla twice per seed (frac=1.0 ignores the criterion): one run per seed counts; sift-loss and random
    with 2 seeds each; times interpolated between evaluations."""
    root = tmp_path / "sweep"
    vanilla = {0: ([0.1, 0.4, 0.6, 0.8], [0, 2.0, 4.0, 6.0]), 1: ([0.1, 0.5, 0.7, 0.8], [0, 2.2, 4.4, 6.6])}
    for seed, (accs, times) in vanilla.items():
        write_run(root / f"{seed}", accs, times, seed=seed)
        # the same seed under another criterion: a repeat, far slower, that must not count
        write_run(root / f"{seed + 4}", accs, [3 * t for t in times], seed=seed, criterion="random")
    arms = {"sift-loss k1 f0.5": {0: ([0.1, 0.6, 0.8], [0, 1.5, 3.0]), 1: ([0.1, 0.55, 0.7], [0, 1.7, 3.4])},
            "random f0.5": {0: ([0.1, 0.45, 0.65], [0, 1.0, 2.0]), 1: ([0.1, 0.5, 0.75], [0, 1.1, 2.2])}}
    for seed, (accs, times) in arms["sift-loss k1 f0.5"].items():
        sift(root / f"{seed + 2}", accs, times, seed=seed)
    for seed, (accs, times) in arms["random f0.5"].items():
        write_run(root / f"{seed + 6}", accs, times, seed=seed, method="random", frac=0.5, criterion="random")
    arms["vanilla"] = vanilla
    everyone, some, unreachable = 0.55, 0.75, 0.99
    table, markdown = tmp_path / "table.csv", tmp_path / "table.md"

    code, out, err = sift_compare(capsys, root, "--target", everyone, "--target", some, "--target", unreachable,
                                  "--csv", table, "--markdown", markdown, "--out", tmp_path / "plots")
    assert code == 0, err
    assert "seed 0, 1 ran more than once" in err and "one run per seed counts" in err

    rows = read_csv(table)
    assert sorted(rows) == sorted(arms)
    base = [interpolated(*vanilla[s], everyone) for s in (0, 1)]
    for arm, runs in arms.items():
        row = rows[arm]
        finals, bests = [accs[-1] for accs, _ in runs.values()], [max(accs) for accs, _ in runs.values()]
        assert (int(row["runs"]), int(row["seeds"])) == ((4 if arm == "vanilla" else 2), 2)
        assert number(row["final_acc_mean"]) == pytest.approx(mean(finals))
        assert number(row["final_acc_std"]) == pytest.approx(stdev(finals))
        assert number(row["best_acc_mean"]) == pytest.approx(mean(bests))
        assert number(row["final_loss_mean"]) == pytest.approx(mean(5 - f for f in finals))  # val_loss = 5 - acc
        assert number(row["final_loss_std"]) == pytest.approx(stdev(finals))
        gaps = [b - a for _, times in runs.values() for a, b in zip(times, times[1:])]
        assert number(row["eval_interval_s"]) == pytest.approx(median(gaps))
        step_ms = [1e3 * times[-1] / (10 * (len(accs) - 1)) for accs, times in runs.values()]
        assert number(row["ms_per_step_mean"]) == pytest.approx(mean(step_ms))
        assert number(row["ms_per_step_std"]) == pytest.approx(stdev(step_ms))

        times = [interpolated(*runs[s], everyone) for s in (0, 1)]
        assert int(row[f"reached_{everyone:g}"]) == 2
        assert number(row[f"time_to_{everyone:g}_mean"]) == pytest.approx(mean(times))
        assert number(row[f"time_to_{everyone:g}_std"]) == pytest.approx(stdev(times))
        if arm == "vanilla":
            assert number(row[f"speedup_{everyone:g}"]) == 1.0 and row[f"speedup_{everyone:g}_significant"] == ""
        else:
            speedup = mean(base) / mean(times)
            spread = speedup * math.hypot(stdev(base) / mean(base), stdev(times) / mean(times))
            assert number(row[f"speedup_{everyone:g}"]) == pytest.approx(speedup)
            assert number(row[f"speedup_{everyone:g}_std"]) == pytest.approx(spread)
            p = ttest_ind(base, times, equal_var=False).pvalue
            assert number(row[f"speedup_{everyone:g}_p"]) == pytest.approx(p)
            assert row[f"speedup_{everyone:g}_significant"] == str(p < 0.05)

        reached_some = sum(max(accs) >= some for accs, _ in runs.values())
        assert int(row[f"reached_{some:g}"]) == reached_some
        assert (row[f"time_to_{some:g}_mean"] == "") == (reached_some < 2)
        assert int(row[f"reached_{unreachable:g}"]) == 0
        assert row[f"time_to_{unreachable:g}_mean"] == row[f"speedup_{unreachable:g}"] == ""

    cells = markdown_rows(markdown)
    assert cells["vanilla"]["seeds"] == "2 (4 runs)" and cells["sift-loss k1 f0.5"]["seeds"] == "2"
    assert cells["vanilla"]["final loss"] == "4.200±0.000"
    assert cells["random f0.5"][f"time to {some:g}"] == "1/2 reached"
    assert cells["sift-loss k1 f0.5"][f"time to {some:g}"] == "1/2 reached"
    assert cells["vanilla"][f"speedup {everyone:g}"] == "baseline"
    assert all(c[f"time to {unreachable:g}"] == "not reached" for c in cells.values())
    text = markdown.read_text()
    assert "linearly interpolated" in text and "eval every" in text and "ms/step: training time per step" in text
    assert cells["sift-loss k1 f0.5"]["ms/step"] == "160±14"  # 3.0 s and 3.4 s for 20 steps: 150 and 170 ms
    assert "1 seed" not in text  # every arm has two


def target_columns(path: Path) -> set[float]:
    return {float(c.removeprefix("reached_")) for c in path.read_text().splitlines()[0].split(",")
            if c.startswith("reached_")}


def test_default_targets_lie_above_the_plateau_a_curve_first_flattens_on(tmp_path, capsys):
    """Vanilla leaves its early plateau (about 0.05) and ends at 0.405; the random arm rises to 0.37 at its first
    evaluation and stays there, so 90% of vanilla's best (0.3645) is reached at its first evaluation and goes."""
    root = tmp_path / "runs"
    write_run(root / "v0", [0.0004, 0.05, 0.052, 0.053, 0.2, 0.40], seed=0)
    write_run(root / "v1", [0.0004, 0.048, 0.050, 0.051, 0.25, 0.41], seed=1)
    sift(root / "s0", [0.0004, 0.05, 0.3, 0.41, 0.42])
    write_run(root / "r0", [0.0004, 0.37, 0.372, 0.373], method="random", frac=0.5, criterion="random")
    code, out, err = sift_compare(capsys, root, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    best = mean([0.40, 0.41])
    shares = [math.floor(best * share * 1e4) / 1e4 for share in (0.90, 0.95, 0.99)]
    assert target_columns(tmp_path / "t.csv") == set(shares[1:])
    caption = " ".join(out.split())
    assert f"dropped {shares[0]:g}: not above 0.3730, the highest plateau a run's curve first flattened on" in caption
    assert "by its first evaluation after step 0" not in err


def test_no_default_targets_when_every_curve_stays_on_its_first_plateau(tmp_path, capsys):
    """`make run`'s curves: the most frequent tokens learnt by the first evaluation, then flat. Targets there
    would be reached by every arm at once, and a speedup of 1.00x would measure the evaluation schedule."""
    root = tmp_path / "runs"
    write_run(root / "v", [0.0004, 0.0543, 0.0581, 0.0598, 0.0604])
    sift(root / "s", [0.0004, 0.0560, 0.0590, 0.0601])
    write_run(root / "r", [0.0004, 0.0550, 0.0589, 0.0600], method="random", frac=0.5, criterion="random")
    code, out, err = sift_compare(capsys, root, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    assert target_columns(tmp_path / "t.csv") == set()
    caption = " ".join(out.split())
    assert "no targets: 90%, 95%, 99% of vanilla's best mean accuracy 0.0604 all lie on or below 0.0604, the " \
           "plateau the curves first flatten on" in caption
    assert "speedup" not in out.split("no targets")[0] and "×" not in out
    assert "Welch" not in caption and "time: training seconds" not in caption  # no times to explain


def test_a_target_every_run_reached_at_its_first_evaluation_is_warned(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"v{seed}", [0.0004, 0.0543 + seed / 1e3, 0.0581, 0.0604], seed=seed)
        sift(root / f"s{seed}", [0.0004, 0.0560, 0.0590, 0.0601], seed=seed)
    code, out, err = sift_compare(capsys, root, "--target", 0.05, "--target", 0.058, "--out", tmp_path)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "by its first evaluation after step 0" in line]
    assert len(warned) == 1 and warned[0].startswith("sift-compare: warning: every run reached 0.05 by its first")
    assert "warning: every run reached 0.05 by its first evaluation" in " ".join(out.split())


def test_default_targets_that_round_to_one_value_say_so(tmp_path, capsys):
    for seed in (0, 1):  # a nearly untrained run: 90, 95 and 99% of 0.0004 are all 0.0003 at 4 decimals
        write_run(tmp_path / f"runs/{seed}", [0.0, 0.0001, 0.0004], seed=seed)
    code, out, err = sift_compare(capsys, tmp_path / "runs", "--out", tmp_path)
    assert code == 0, err
    caption = " ".join(out.split())
    assert "best mean accuracy 0.0004, at 4 decimals only 0.0003" in caption and "dropped" not in caption


def test_interrupted_runs_are_left_out_unless_asked(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_run(root / f"v{seed}", [0.1, 0.5, 0.8], seed=seed)
        sift(root / f"s{seed}", [0.1, 0.6, 0.9 - 0.1 * (seed == 2)], seed=seed,
             status="interrupted" if seed == 2 else "completed")
    write_run(root / "v3", [0.1, 0.2], seed=3, status="preempted")
    table = tmp_path / "table.csv"

    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", table, "--out", tmp_path)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "did not complete" in line]
    assert len(warnings) == 1
    assert f"{(root / 's2').resolve()} (interrupted)" in warnings[0]
    assert f"{(root / 'v3').resolve()} (preempted)" in warnings[0]
    rows = read_csv(table)
    assert (rows["sift-loss k1 f0.5"]["seeds"], rows["vanilla"]["seeds"]) == ("2", "3")
    assert number(rows["sift-loss k1 f0.5"]["final_acc_mean"]) == pytest.approx(0.9)

    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", table, "--markdown", tmp_path / "t.md",
                                  "--out", tmp_path, "--include-incomplete")
    assert code == 0, err and "did not complete" not in err
    rows = read_csv(table)
    assert (rows["sift-loss k1 f0.5"]["seeds"], rows["sift-loss k1 f0.5"]["incomplete"]) == ("3", "1 interrupted")
    assert (rows["vanilla"]["seeds"], rows["vanilla"]["incomplete"]) == ("4", "1 preempted")
    assert number(rows["sift-loss k1 f0.5"]["final_acc_mean"]) == pytest.approx((0.9 + 0.9 + 0.8) / 3)
    assert markdown_rows(tmp_path / "t.md")["sift-loss k1 f0.5"]["seeds"] == "3 (1 interrupted)"
    assert "3 (1 interrupted)" in out


def test_batch_mode_names_the_arm_when_not_the_default(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"v{seed}", [0.1, 0.5, 0.8], seed=seed)
        sift(root / f"s{seed}", [0.1, 0.6, 0.8], seed=seed)
        sift(root / f"u{seed}", [0.1, 0.7, 0.8], seed=seed, config={"trainer": {"batch_mode": "updated"}})
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    rows = read_csv(tmp_path / "t.csv")
    assert sorted(rows) == ["sift-loss k1 f0.5", "sift-loss k1 f0.5 batch=updated", "vanilla"]
    assert all(row["setting"] == "" for row in rows.values())  # a selection knob, not a setting
    assert "sift-loss k1 f0.5 batch=updated" in out


def test_a_selection_schedule_names_the_arm_and_keeps_it_apart(tmp_path, capsys):
    """Runs saved before selection schedules and accumulation (no selection.* keys, no trainer.accumulate) selected
    on every step in one batch: the defaults, with which they are pooled."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"v{seed}", [0.1, 0.5, 0.8], seed=seed,
                  config={"selection": {"start": 0.5, "end": 0.9, "every": 2}})  # vanilla: the schedule is moot
        sift(root / f"s{seed}", [0.1, 0.6, 0.8], seed=seed)
        sift(root / f"d{seed}", [0.1, 0.6, 0.8], seed=seed, config={"selection": {"start": 0.0, "end": 1.0,
                                                                                 "every": 1},
                                                                   "trainer": {"accumulate": 1}})
        sift(root / f"w{seed}", [0.1, 0.7, 0.8], seed=seed, config={"selection": {"start": 0.5, "end": 0.9,
                                                                                 "every": 2}})
        sift(root / f"e{seed}", [0.1, 0.7, 0.8], seed=seed, config={"selection": {"every": 3}})
        # arm=composer: exit_layer=depth in the config, the model's last block (2) in the summary
        write_run(root / f"c{seed}", [0.1, 0.7, 0.8], seed=seed, method="loss_proportional", frac=0.5,
                  criterion="loss_proportional", exit_layer=2,
                  config={"exit_layer": "depth", "selection": {"start": 0.5, "end": 0.9, "every": 2}})
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    rows = read_csv(tmp_path / "t.csv")
    assert sorted(rows) == ["loss_proportional k2 f0.5 [0.5-0.9 /2]", "sift-loss k1 f0.5", "sift-loss k1 f0.5 [/3]",
                            "sift-loss k1 f0.5 [0.5-0.9 /2]", "vanilla"]
    assert all(row["setting"] == "" for row in rows.values())  # selection knobs, not a setting
    assert "sift-loss k1 f0.5 [0.5-0.9 /2]" in out


def test_runs_on_different_hardware_are_kept_apart(tmp_path, capsys):
    root = tmp_path / "runs"
    h100 = {"accelerator": "NVIDIA H100 80GB HBM3", "device": "cuda"}
    for seed in (0, 1):
        write_run(root / f"cpu{seed}", [0.1, 0.5, 0.8], [0, 10.0, 20.0], seed=seed)
        write_run(root / f"gpu{seed}", [0.1, 0.5, 0.8], [0, 1.0, 2.0], seed=seed, summary=h100)
        sift(root / f"sift{seed}", [0.1, 0.5, 0.8], [0, 0.5, 1.0], seed=seed, summary=h100)
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err and "more than once" not in err
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], r["setting"]) for r in rows] == [
        ("vanilla", "accelerator=NVIDIA H100 80GB HBM3 device=cuda"), ("vanilla", "accelerator=Test CPU device=cpu"),
        ("sift-loss k1 f0.5", "accelerator=NVIDIA H100 80GB HBM3 device=cuda")]
    assert number(rows[2]["speedup_0.5"]) == pytest.approx(2.0)  # against vanilla on the H100, not the CPU


def test_runs_on_other_tokens_are_kept_apart(tmp_path, capsys):
    """The same config, but the token cache was built again in between, with a tokenizer that numbers its
    vocabulary otherwise: the accuracies are of different problems."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"vanilla{seed}", [0.1, 0.5, 0.8], [0, 1.0, 2.0], seed=seed,
                  summary={"data_fingerprint": "first"})
        sift(root / f"sift{seed}", [0.1, 0.5, 0.8], [0, 0.5, 1.0], seed=seed, summary={"data_fingerprint": "rebuilt"})
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv")
    assert code == 0, err
    rows = read_csv(tmp_path / "t.csv")
    assert rows["sift-loss k1 f0.5"]["setting"] == "data_fingerprint=rebuilt"
    assert rows["sift-loss k1 f0.5"]["speedup_0.5"] == ""  # no vanilla on its tokens


def test_a_run_whose_compile_fell_back_to_eager_is_not_compared_with_compiled_vanilla(tmp_path, capsys):
    """The same config (trainer.compile=auto on a GPU), but SIFT's step ran eagerly: a speedup against the
    compiled vanilla would measure the compiler, not the method."""
    root, gpu = tmp_path / "runs", {"accelerator": "NVIDIA H100 80GB HBM3", "device": "cuda"}
    for seed in (0, 1):
        write_run(root / f"vanilla{seed}", [0.1, 0.5, 0.8], [0, 1.0, 2.0], seed=seed,
                  summary={**gpu, "compiled": True, "cuda_graphs": False})
        sift(root / f"sift{seed}", [0.1, 0.5, 0.8], [0, 2.0, 4.0], seed=seed,
             summary={**gpu, "compiled": False, "cuda_graphs": False})
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    with open(tmp_path / "t.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert (rows["vanilla"]["setting"], rows["sift-loss k1 f0.5"]["setting"]) == ("compiled=True", "compiled=False")
    assert rows["sift-loss k1 f0.5"]["speedup_0.5"] == ""  # no vanilla ran its step the same way


def test_known_answer_data_setting_is_shown(tmp_path, capsys):
    """Noise is shown even between data choices of different names (whose other keys are not)."""
    root = tmp_path / "runs"
    noisy = {"data": {"noise_fraction": 0.2, "seq_len": 64}}
    write_run(root / "clean", [0.1, 0.5, 0.8])
    write_run(root / "noisy", [0.1, 0.4, 0.7], config=noisy, summary={"data": "noisy_text"})
    code, out, err = sift_compare(capsys, root, "--target", 0.3, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    with open(tmp_path / "t.csv") as f:
        settings = sorted(r["setting"] for r in csv.DictReader(f))
    assert settings == ["data=noisy_text data.noise_fraction=0.2", "data=text_files data.noise_fraction=0.0"]


def test_the_caption_says_how_many_times_the_runs_read_their_data(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "v", [0.1, 0.5, 0.8], summary={"data_passes": 2.75})
    sift(root / "s", [0.1, 0.6, 0.9], summary={"data_passes": 110.3})
    write_run(root / "old", [0.1, 0.5, 0.8], seed=1)  # a record from before data_passes: nothing to say
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--out", tmp_path)
    assert code == 0, err
    assert "data: the runs read their training data 2.8 to 110.3 times (data_passes)" in " ".join(out.split())


def test_the_caption_names_an_arm_whose_steps_were_timed_unevenly(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "v0", [0.1, 0.5, 0.8], [0.0, 1.0, 2.0])
    write_run(root / "v1", [0.1, 0.5, 0.8], [0.0, 3.0, 6.0], seed=1)  # the same 20 steps, three times slower
    for seed in (0, 1):
        sift(root / f"s{seed}", [0.1, 0.6, 0.9], [0.0, 1.0, 2.1 + seed / 10], seed=seed)
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--out", tmp_path)
    assert code == 0, err
    caption = " ".join(out.split())
    assert "uneven: ms/step varies between seeds (std/mean) of vanilla (71%): the machine's load" in caption
    assert "sift-loss" not in caption.split("uneven:")[1]  # 5% apart: one machine's noise


def test_the_caption_names_an_arm_whose_flop_rate_differs_from_vanillas(tmp_path, capsys):
    """`experiment=digits_resnet` run back to back while the load rose: SIFT's step ran at 1.7x vanilla's FLOP
    rate on the same CPU. Every seed of each arm is even, so only a comparison across arms sees it. On a GPU a
    smaller step runs at a lower rate by itself: not named there."""
    root, gpu = tmp_path / "runs", {"accelerator": "NVIDIA H100 80GB HBM3", "device": "cuda"}
    arms = {"vanilla": (1e9, 2.0), "sift-loss k1 f0.5": (0.6e9, 0.7), "random f0.5": (0.5e9, 1.05)}
    for seed in (0, 1):
        for where, extra in (("cpu", {}), ("gpu", gpu)):
            for arm, (flops, seconds) in arms.items():
                kind = {"method": "random", "frac": 0.5, "criterion": "random"} if arm.startswith("random") else \
                    {"method": "sift-loss", "frac": 0.5} if arm.startswith("sift") else {}
                write_run(root / f"{where}-{arm}-{seed}", [0.1, 0.5, 0.8], [0, seconds / 2, seconds + seed / 100],
                          seed=seed, summary={**extra, "flops_per_step": flops}, **kind)
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0, err
    with open(tmp_path / "t.csv") as f:
        rows = {(r["arm"], r["setting"].split()[-1]): r for r in csv.DictReader(f)}
    for (arm, where), row in rows.items():
        flops, seconds = arms[arm]
        rates = [flops * 20 / (seconds + seed / 100) / 1e12 for seed in (0, 1)]  # 20 steps a run
        assert number(row["tflops_mean"]) == pytest.approx(mean(rates))
        base = mean(arms["vanilla"][0] * 20 / (arms["vanilla"][1] + seed / 100) / 1e12 for seed in (0, 1))
        assert number(row["flop_rate_vs_vanilla"]) == pytest.approx(mean(rates) / base)
    caption = " ".join(out.split())
    machine = caption.split("machine: ")[1].split(" (model TFLOP/s) of ")[1].split(" differs from")[0]
    ratio = number(rows[("sift-loss k1 f0.5", "device=cpu")]["flop_rate_vs_vanilla"])
    assert machine.startswith(f"sift-loss k1 f0.5 accelerator=Test CPU device=cpu ({ratio:.2f}x")
    assert "random" not in machine and "cuda" not in machine  # 0.95x; a GPU's rate is not compared
    assert "more than 1.2x" in caption and "interleave the arms" in caption


def test_the_table_reads_at_80_columns(tmp_path):
    """Arms with long names, three targets and two settings: parts of one line per arm, nothing cut."""
    root = tmp_path / "runs"
    small = {"model": {"hidden_size": 256}}
    for seed in (0, 1, 2):
        for name, cfg, summary in (("tiny", {}, {}), ("small", small, {"model": "bert_small"})):
            write_run(root / f"{name}-v{seed}", [0.1, 0.5, 0.7, 0.8], [0, 11.0, 23.5, 34.0 + seed], seed=seed,
                      config=cfg, summary=summary)
            write_run(root / f"{name}-p{seed}", [0.1, 0.6, 0.75, 0.8], [0, 6.0, 12.0, 18.5 + seed], seed=seed,
                      method="loss_proportional", frac=0.25,
                      config=merged(cfg, {"trainer": {"batch_mode": "updated"}}), summary=summary)
    write_run(root / "random", [0.1, 0.55, 0.7, 0.71], [0, 5.0, 10.0, 15.0], method="random", frac=0.5,
              criterion="random")
    console = Console(width=80, record=True, file=io.StringIO())
    compare(parse_args([str(root), "--target", "0.52", "--target", "0.65", "--target", "0.78",
                        "--out", str(tmp_path)]), console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in text
    arms = ["vanilla", "loss_proportional k1 f0.25 batch=updated", "random f0.5"]
    parts = [i for i, line in enumerate(lines) if line.startswith("arm ")]
    assert len(parts) > 1  # too wide for one table at 80 columns: parts, each naming the arms
    for start in parts:  # header, rule, then exactly one line per arm
        body = lines[start + 2:start + 2 + 5]
        assert [next(a for a in arms if line.startswith(a)) for line in body] == [arms[0], arms[0], arms[1], arms[1],
                                                                                 arms[2]]
        assert not lines[start + 7].strip()
    for cell in ("0.800±0.000", "32.7±0.8", "16.5±0.6", "1.98±0.09×", "4.67", "not reached"):
        assert any(cell in line for line in lines), cell
    settings = sorted(line.split(": ", 1)[1] for line in lines if line.startswith("set "))
    assert settings == ["model=bert_small", "model=bert_tiny"]  # each setting by a letter, in the caption
    assert "1 seed: no spread, not a result: random f0.5" in " ".join(lines)


def test_a_speedup_is_significant_when_welchs_test_says_so(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, (v, s, r) in enumerate(((10.0, 5.0, 6.0), (12.0, 5.2, 14.0), (11.0, 5.1, 10.0))):
        write_run(root / f"v{seed}", [0.0, 1.0], [0, 2 * v], seed=seed)  # reaches 0.5 at v seconds
        sift(root / f"s{seed}", [0.0, 1.0], [0, 2 * s], seed=seed)
        write_run(root / f"r{seed}", [0.0, 1.0], [0, 2 * r], seed=seed, method="random", frac=0.5)
    code, out, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / "t.csv",
                                  "--markdown", tmp_path / "t.md", "--out", tmp_path)
    assert code == 0, err
    rows, cells = read_csv(tmp_path / "t.csv"), markdown_rows(tmp_path / "t.md")
    assert rows["sift-loss k1 f0.5"]["speedup_0.5_significant"] == "True"
    assert rows["random f0.5"]["speedup_0.5_significant"] == "False"
    assert cells["sift-loss k1 f0.5"]["speedup 0.5"] == "2.16±0.20×"
    assert cells["random f0.5"]["speedup 0.5"].endswith("× n.s.")
    assert "n.s.: not significant, Welch's t-test" in " ".join(out.split())


def test_more_seeds_of_the_same_spread_make_a_speedup_significant(tmp_path, capsys):
    def verdict(seeds: int) -> str:
        root = tmp_path / f"runs{seeds}"
        for seed in range(seeds):
            wobble = (-1.0, 1.0)[seed % 2]  # every arm's spread the same whatever the number of seeds
            write_run(root / f"v{seed}", [0.0, 1.0], [0, 2 * (10 + 2 * wobble)], seed=seed)
            sift(root / f"s{seed}", [0.0, 1.0], [0, 2 * (6 + 1.2 * wobble)], seed=seed)
        code, _, err = sift_compare(capsys, root, "--target", 0.5, "--csv", tmp_path / f"t{seeds}.csv")
        assert code == 0, err
        return read_csv(tmp_path / f"t{seeds}.csv")["sift-loss k1 f0.5"]["speedup_0.5_significant"]

    assert (verdict(2), verdict(8)) == ("False", "True")


def test_unknown_tuned_key_lists_the_keys_that_vary(tmp_path, capsys):
    write_run(tmp_path / "runs/0", [0.1, 0.5])
    sift(tmp_path / "runs/1", [0.1, 0.6], config={"trainer": {"optimizer": {"lr": 3e-3}}})
    code, out, err = sift_compare(capsys, tmp_path / "runs", "--tuned", "trainer.optimizer.lrr")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--tuned trainer.optimizer.lrr" in err and "vary between these runs: trainer.optimizer.lr" in err


def test_a_tuned_key_that_does_not_vary_is_warned_about(tmp_path, capsys):
    write_run(tmp_path / "runs/0", [0.1, 0.5])
    sift(tmp_path / "runs/1", [0.1, 0.6], config={"trainer": {"optimizer": {"lr": 3e-3}}})
    code, out, err = sift_compare(capsys, tmp_path / "runs", "--tuned", "trainer.batch_size", "--out", tmp_path)
    assert code == 0, err
    assert f"sift-compare: warning: --tuned trainer.batch_size: every run has trainer.batch_size={BATCH}, so it " \
           f"changes nothing; the keys that vary between these runs: trainer.optimizer.lr" in err
    code, out, err = sift_compare(capsys, tmp_path / "runs", "--tuned", "trainer.optimizer.lr", "--out", tmp_path)
    assert code == 0 and "--tuned" not in err


def test_arms_tuned_to_their_own_learning_rate_compare_with_tuned_flag(tmp_path, capsys):
    """A per-arm rate makes separate settings, so no speedup; --tuned KEY compares across it."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"v{seed}", [0.1, 0.5, 0.8], seed=seed)
        sift(root / f"s{seed}", [0.1, 0.6, 0.8], seed=seed, config={"trainer": {"optimizer": {"lr": 0.01}}})
    plain, tuned = tmp_path / "plain.csv", tmp_path / "tuned.csv"
    assert sift_compare(capsys, root, "--target", 0.5, "--csv", plain, "--out", tmp_path)[0] == 0
    assert sift_compare(capsys, root, "--target", 0.5, "--csv", tuned, "--out", tmp_path,
                        "--tuned", "trainer.optimizer.lr")[0] == 0
    assert read_csv(plain)["sift-loss k1 f0.5"]["speedup_0.5"] == ""  # no vanilla at lr 0.01
    assert number(read_csv(tuned)["sift-loss k1 f0.5"]["speedup_0.5"]) > 1


def read_png(path: Path):
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0
    return image


def probes(count: int, shift: float = 0.0) -> list[dict]:
    return [{"step": 10 * i, "train_time_s": float(i), "spearman_k1": 0.5 + shift, "overlap_k1": 0.4 + shift,
             "spearman_k2": 1.0, "overlap_k2": 1.0} for i in range(count)]


def test_diagnostics_plot_only_when_diagnostics_were_recorded(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "v0", [0.1, 0.5, 0.8])
    sift(root / "s0", [0.1, 0.6, 0.8], scores=True)  # kept and dropped scores, diagnostics off
    code, out, err = sift_compare(capsys, root, "--target", 0.3, "--out", tmp_path / "off")
    assert code == 0, err
    read_png(tmp_path / "off/accuracy_vs_time.png")
    read_png(tmp_path / "off/accuracy_vs_samples.png")
    assert not (tmp_path / "off/diagnostics.png").exists()

    (root / "s0/diagnostics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes(3)))
    code, out, err = sift_compare(capsys, root, "--target", 0.3, "--out", tmp_path / "on")
    assert code == 0, err
    # one group probed (vanilla did not): spearman, overlap and the kept/dropped scores
    height, width = read_png(tmp_path / "on/diagnostics.png").shape[:2]
    assert width / height == pytest.approx((3 * 4.2) / 3, rel=0.02)


def test_diagnostics_plot_from_written_probes(tmp_path, capsys):
    """Vanilla runs (no kept/dropped scores) with diagnostics.jsonl, one with a corrupt line."""
    folders = [write_run(tmp_path / f"runs/{i}", [0.1, 0.5, 0.8], seed=i, probes=probes(3, 0.1 * i)) for i in (0, 1)]
    with open(folders[1] / "diagnostics.jsonl", "a") as f:
        f.write("{not json\n")
    code, out, err = sift_compare(capsys, tmp_path / "runs", "--target", 0.3, "--out", tmp_path)
    assert code == 0, err
    assert "diagnostics.jsonl:4 is not a JSON line" in err
    # one group, spearman and overlap, no score panel
    height, width = read_png(tmp_path / "diagnostics.png").shape[:2]
    assert width / height == pytest.approx((2 * 4.2) / 3, rel=0.02)


def error_line(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_paths_from_the_command_line(tmp_path):
    """The console entry point: one line, exit code 2."""
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "sift_cli.compare", *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        return done.returncode, done.stderr

    assert "does not exist" in error_line(*run(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no runs under" in error_line(*run(tmp_path / "empty"))


def test_bad_target(tmp_path, capsys):
    write_run(tmp_path / "run", [0.1, 0.5])
    assert "(0, 1]" in error_line(*sift_compare(capsys, tmp_path, "--target", "1.5")[::2])


def test_mixed_tasks(tmp_path, capsys):
    write_run(tmp_path / "text", [0.1, 0.5])
    sift(tmp_path / "image", [0.1, 0.5], summary={"task": "image"})
    line = error_line(*sift_compare(capsys, tmp_path)[::2])
    assert "different tasks" in line and "mlm" in line and "image" in line


def test_corrupt_unfinished_and_failed_runs_are_skipped(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", [0.1, 0.5])
    corrupt = sift(sweep / "1", [0.1, 0.5])
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "val_a\n')
    unfinished = sift(sweep / "2", [0.1, 0.5], seed=1)
    (unfinished / "summary.json").unlink()
    failed = sweep / "3"  # a job that failed before its first evaluation: Hydra's folder and its log only
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra/overrides.yaml").write_text("- frac=0.5\n")
    (failed / "train.log").write_text("ConfigError\n")
    code, out, err = sift_compare(capsys, sweep, "--target", 0.3, "--csv", tmp_path / "t.csv", "--out", tmp_path)
    assert code == 0 and "Traceback" not in err
    warnings = err.strip().splitlines()
    assert any(f"skipping {corrupt.resolve()}" in w and "metrics.jsonl:3" in w for w in warnings)
    assert any(f"skipping {unfinished.resolve()}" in w and "no summary.json" in w for w in warnings)
    assert any(f"skipping {failed.resolve()}" in w and "no metrics.jsonl" in w for w in warnings)
    assert list(read_csv(tmp_path / "t.csv")) == ["vanilla"]  # only the good run is left

    # nothing left to compare: the warning, then one error line
    code, out, err = sift_compare(capsys, failed)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sift-compare: error: no complete runs")
