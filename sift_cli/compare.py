"""`sift-compare`: how much sooner does SIFT reach a target accuracy than vanilla training?

Reads run folders only (summary.json, metrics.jsonl, the optional diagnostics.jsonl) and never
imports training code. Runs that differ only in their seed form a group (an arm); each arm gets one
row: final and best validation accuracy, training time to each target (over seeds) and the speedup
against the vanilla arm of the same setting. Plots go beside the table.

    sift-compare outputs/multirun/2025-01-01_12-00-00 --target 0.3 --csv table.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402
from scipy import stats  # noqa: E402

from sift_cli.records import (DIAGNOSTICS, METRICS, SUMMARY, flat_config, read_metrics, schedule_parts,  # noqa: E402
                              time_to_target)

# config keys that do not change what a run learns, so runs differing only there are repeats
IGNORED = {"seed", "name", "tags", "targets", "trainer.progress", "trainer.device", "trainer.eval_batch_size",
           "data.cache_dir", "trainer.resume", "trainer.checkpoint_every_s", "trainer.checkpoint_every_steps",
           "trainer.keep_checkpoints"}
IGNORED_PREFIXES = ("logger.", "hydra.", "diagnostics.")  # probing pauses the clock and changes nothing
# the selection knobs, and the ones each method uses: frac=1.0 is vanilla whatever criterion says
SCHEDULE = ("selection.start", "selection.end", "selection.every")  # when to select
# keys added since runs were first recorded, at the values a run saved before them trained with
ADDED_KEYS = {"selection.start": 0.0, "selection.end": 1.0, "selection.every": 1, "trainer.accumulate": 1}
SELECTION = ("frac", "exit_layer", "criterion", "trainer.batch_mode", "trainer.selection_scope", *SCHEDULE)
USED_KNOBS = {"vanilla": (), "random": ("frac", "trainer.batch_mode", *SCHEDULE)}
# criterion: in the name
SIFT_KNOBS = ("frac", "exit_layer", "trainer.batch_mode", "trainer.selection_scope", *SCHEDULE)
# knobs an arm's name shows, as (short name, default): when not at the default (None: when the arms differ)
NAMED_KNOBS = {"trainer.batch_mode": ("batch", "scored"), "trainer.selection_scope": ("scope", None)}
# what the run ran on, from its summary: runs on different hardware or process counts, on other tokens (a
# tokenizer trained again), or whose steps ran differently (a compile that fell back to eager, CUDA graphs left
# out), are kept apart
RAN_ON = ("model", "data", "data_fingerprint", "device", "accelerator", "world_size", "compiled", "cuda_graphs")
# the known-answer data setting: shown whenever it differs, even between data choices of different names
KNOWN_ANSWER = ("data.duplicate_fraction", "data.duplicate_pool", "data.noise_fraction")
COMPLETED = "completed"
TARGET_SHARES = (0.90, 0.95, 0.99)  # default targets: shares of vanilla's best mean accuracy
FLAT = 0.1  # a curve flattens where an evaluation gains less than this share of its first rise
SIGNIFICANCE = 0.05  # a speedup counts when Welch's t-test rejects equal mean times at this level
UNEVEN_STEPS = 0.25  # std/mean of an arm's ms/step over seeds above which its runs met different machines
# an arm's FLOP rate against vanilla's beyond which the machine changed between the arms. On a CPU the step is
# compute-bound and every arm ran within 1.1x of vanilla's rate (benchmarks/results/step_cost-quick.md); on a GPU
# a smaller step runs at a lower rate (launch-bound), so the rate is compared on CPUs only
FLOP_RATE_TOLERANCE = 1.2
PIPED_WIDTH = 240  # piped output gets the width a table needs, not rich's default of 80 columns
DIAGNOSTIC_KEY = re.compile(r"(spearman|overlap)_k(\d+)")


class CompareError(Exception):
    """Bad input: one line on stderr, exit code 2."""


def warn(message: str) -> None:
    print(f"sift-compare: warning: {message}", file=sys.stderr)


@dataclass
class Run:
    folder: Path
    summary: dict
    rows: list[dict]  # metrics.jsonl
    diagnostics: list[dict]  # diagnostics.jsonl, empty when the run has none

    @property
    def status(self) -> str:
        return self.summary.get("status", COMPLETED)  # records older than the status key ran to their end


@dataclass
class Group:
    method: str
    knobs: dict  # the selection knobs this method uses
    setting: dict  # everything else that shapes training, flattened to dotted keys
    runs: list[Run]  # one per seed: what the numbers are taken over
    repeats: list[Run] = field(default_factory=list)  # further runs of a seed, left out of the numbers
    arm: str = ""  # the method and its knobs, e.g. "sift-loss k1 f0.5"
    label: str = ""  # what tells this group's setting apart from the others, e.g. "model=bert_small"

    @property
    def first(self) -> dict:
        return self.runs[0].summary

    @property
    def name(self) -> str:
        return f"{self.arm} {self.label}".strip()


# ---------------------------------------------------------------------------------------------
# finding and reading runs


def find_run_folders(paths: list[str]) -> list[Path]:
    """Every run folder under each path, each once: one holding a record, or a Hydra job folder (.hydra/ or
    train.log) whose job failed before writing any, so that it is warned about rather than missed."""
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise CompareError(f"{name} does not exist; give run folders or sweep folders of sift-train")
        if not path.is_dir():
            raise CompareError(f"{name} is not a folder; give run folders or sweep folders of sift-train")
        marks = [p for pattern in (SUMMARY, METRICS, ".hydra", "train.log") for p in sorted(path.rglob(pattern))]
        folders = [p.parent.resolve() for p in marks]
        if not folders:
            raise CompareError(f"no runs under {name}: a run folder holds {SUMMARY} and {METRICS}")
        found.update(dict.fromkeys(folders))
    return list(found)


def load_run(folder: Path) -> Optional[Run]:
    """The run's records, or None (with a warning) when they are missing, incomplete or corrupt."""
    if not (folder / METRICS).exists():
        why = f"{SUMMARY} but no {METRICS}" if (folder / SUMMARY).exists() else \
            f"no {METRICS} (the job failed before its first evaluation; its log says why)"
        warn(f"skipping {folder}: {why}")
        return None
    if not (folder / SUMMARY).exists():
        warn(f"skipping {folder}: {METRICS} but no {SUMMARY} (killed at its first evaluation, or written by a "
             f"version that wrote {SUMMARY} only at the end)")
        return None
    try:
        summary = json.loads((folder / SUMMARY).read_text())
        rows = read_metrics(folder)
    except json.JSONDecodeError:
        warn(f"skipping {folder}: {folder / SUMMARY} is not valid JSON")
        return None
    except ValueError as err:  # read_metrics names the file and line
        warn(f"skipping {folder}: {err}")
        return None
    missing = [k for k in ("method", "task", "seed", "config", "final_val_acc", "best_val_acc") if k not in summary]
    if missing or not rows:
        warn(f"skipping {folder}: {SUMMARY} lacks {', '.join(missing)}" if missing else
             f"skipping {folder}: {METRICS} has no rows")
        return None
    diagnostics = []
    if (folder / DIAGNOSTICS).exists():
        try:
            diagnostics = read_metrics(folder, DIAGNOSTICS)
        except ValueError as err:
            warn(f"{err}; plotting no diagnostics for {folder}")
    return Run(folder, summary, rows, diagnostics)


def load_runs(paths: list[str], include_incomplete: bool = False) -> list[Run]:
    runs = [run for run in map(load_run, find_run_folders(paths)) if run is not None]
    incomplete = [run for run in runs if run.status != COMPLETED]
    if incomplete and not include_incomplete:
        warn(f"leaving out {len(incomplete)} run(s) that did not complete (running: still training, or killed; "
             f"--include-incomplete keeps them): "
             + ", ".join(f"{run.folder} ({run.status})" for run in incomplete))
        runs = [run for run in runs if run.status == COMPLETED]
    if not runs:
        raise CompareError(f"no complete runs under {' '.join(paths)} (see the warnings above)")
    tasks: dict[str, list[Run]] = {}
    for run in runs:
        tasks.setdefault(run.summary["task"], []).append(run)
    if len(tasks) > 1:
        kinds = ", ".join(f"{task} ({len(rs)} runs, e.g. {rs[0].folder})" for task, rs in tasks.items())
        raise CompareError(f"runs of different tasks cannot be compared: {kinds}; give the folders of one task")
    return runs


# ---------------------------------------------------------------------------------------------
# grouping: every seed of one setting


def shapes_training(key: str) -> bool:
    """Whether a config key belongs to the setting: not ignored, and not a selection knob."""
    return key not in IGNORED and key not in SELECTION and not key.startswith(IGNORED_PREFIXES)


def group_key(run: Run, tuned: frozenset = frozenset()) -> tuple[str, dict, dict]:
    """(method, the selection knobs it uses, the setting): runs equal in all three differ only by seed.

    Keys in `tuned` (e.g. a learning rate each arm chose for itself) are left out of the setting, so
    each arm is compared with vanilla at vanilla's own value."""
    s = run.summary
    # exit_layer as the run resolved it: exit_layer=depth is the model's last block
    flat = {**ADDED_KEYS, **flat_config(s["config"]), "exit_layer": s["exit_layer"]}
    knobs = {k: flat.get(k) for k in USED_KNOBS.get(s["method"], SIFT_KNOBS)}
    setting = {k: v for k, v in flat.items() if shapes_training(k) and k not in tuned}
    # the choice names and what the run actually ran on (the config may say "auto")
    setting.update({k: s.get(k) for k in RAN_ON})
    return s["method"], knobs, setting


def check_tuned(runs: list[Run], tuned: list[str]) -> None:
    """A --tuned key must be a config key of these runs (a typo would silently compare nothing), and one whose
    value differs between them (otherwise it changes nothing, which is worth a warning)."""
    flats = [flat_config(run.summary["config"]) for run in runs]
    values = {k: {json.dumps(flat.get(k), default=str) for flat in flats} for flat in flats for k in flat}
    varying = ", ".join(k for k in sorted(values) if shapes_training(k) and len(values[k]) > 1) or "none"
    for key in tuned:
        if key not in values:
            raise CompareError(f"--tuned {key}: no run has this config key; the keys that vary between these "
                               f"runs: {varying}")
        if len(values[key]) == 1:
            warn(f"--tuned {key}: every run has {key}={next(iter(values[key]))}, so it changes nothing; the keys "
                 f"that vary between these runs: {varying}")


def group_runs(runs: list[Run], tuned: frozenset = frozenset()) -> list[Group]:
    groups: dict[str, Group] = {}
    # a completed run, then folder order, is the one kept of a seed that ran more than once
    for run in sorted(runs, key=lambda r: (r.status != COMPLETED, str(r.folder))):
        method, knobs, setting = group_key(run, tuned)
        key = json.dumps([method, knobs, setting], sort_keys=True, default=str)
        group = groups.setdefault(key, Group(method, knobs, setting, []))
        seeds = {r.summary["seed"] for r in group.runs}
        (group.repeats if run.summary["seed"] in seeds else group.runs).append(run)
    ordered = sorted(groups.values(), key=lambda g: (g.method != "vanilla", g.method, -g.first["frac"],
                                                     g.first["exit_layer"], json.dumps(g.knobs, default=str),
                                                     json.dumps(g.setting, sort_keys=True, default=str)))
    name_groups(ordered)
    return ordered


def varying(dicts: list[dict]) -> list[str]:
    """The keys whose values differ between the dicts (a missing key counts as None)."""
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({json.dumps(d.get(k), default=str) for d in dicts}) > 1]


def name_groups(groups: list[Group]) -> None:
    """Each group's arm (method and knobs) and label (the setting keys that differ between groups; a differing
    model or data name stands for its keys, except the known-answer data keys, always shown)."""
    for g in groups:
        parts = [g.method] + [f"{short}{g.knobs[k]:g}" for k, short in (("exit_layer", "k"), ("frac", "f"))
                              if k in g.knobs]
        if SCHEDULE[0] in g.knobs and (schedule := schedule_parts(*(g.knobs[k] for k in SCHEDULE))):
            parts.append(f"[{' '.join(schedule)}]")  # e.g. [0.5-0.9 /2]: selecting in half of 50-90% of the run
        for key, (short, default) in NAMED_KNOBS.items():
            value = g.knobs.get(key)
            if value is not None and (value != default if default is not None else
                                      len({h.knobs[key] for h in groups if key in h.knobs}) > 1):
                parts.append(f"{short}={value}")
        g.arm = " ".join(parts)
    keys = varying([g.setting for g in groups])
    named = [k for k in ("model", "data") if k in keys]
    shown = [k for k in keys if k in KNOWN_ANSWER or not any(k.startswith(f"{n}.") for n in named)]
    for g in groups:
        g.label = " ".join(f"{k}={g.setting.get(k)}" for k in shown)


def reference_for(group: Group, groups: list[Group]) -> Optional[Group]:
    """The vanilla group with the same setting: the baseline of this group's speedup."""
    return next((g for g in groups if g.method == "vanilla" and g.setting == group.setting), None)


def seed_note(group: Group) -> Optional[str]:
    if not group.repeats:
        return None
    repeated = sorted({r.summary["seed"] for r in group.repeats})
    why = " (frac=1.0 trains the same way whatever criterion and exit_layer say)" if group.method == "vanilla" else ""
    return (f"{group.name}: seed {', '.join(map(str, repeated))} ran more than once{why}; one run per seed "
            f"counts, so that repeats do not shrink the spread")


# ---------------------------------------------------------------------------------------------
# the numbers


MeanStd = tuple[float, Optional[float]]  # the std is None for a single value


def mean_std(values: list[float]) -> MeanStd:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def first_plateau(rows: list[dict]) -> float:
    """The accuracy a curve first flattens on: from its first evaluation after the start, as long as each
    evaluation gains less than FLAT of that first rise, the highest accuracy reached (on a text corpus, e.g.,
    predicting the most frequent tokens). A curve still rising after its first evaluation flattens there."""
    accs = [row["val_acc"] for row in rows]
    if len(accs) < 2:
        return accs[0]
    rise, level = accs[1] - accs[0], accs[1]
    for before, acc in zip(accs[1:], accs[2:]):
        if acc - before >= FLAT * rise:
            break
        level = max(level, acc)
    return level


def default_targets(groups: list[Group]) -> tuple[list[float], list[str]]:
    """90, 95 and 99% of vanilla's best mean accuracy (of the best group's without vanilla), each above the
    plateau every run's curve first flattens on, so that the time to it measures training, not how soon the
    first evaluations came."""
    vanilla = [g for g in groups if g.method == "vanilla"]
    pool = vanilla or groups
    best = max(mean_std([r.summary["best_val_acc"] for r in g.runs])[0] for g in pool)
    plateau = max(first_plateau(r.rows) for g in groups for r in g.runs)
    # floored to 4 decimals: a printed target never exceeds the accuracy it was derived from
    shares = sorted({math.floor(best * share * 1e4) / 1e4 for share in TARGET_SHARES})
    whose = "vanilla's" if vanilla else "the best group's (no vanilla runs)"
    kept = [t for t in shares if t > plateau]
    if not kept:
        return [], [f"no targets: {', '.join(f'{s:.0%}' for s in TARGET_SHARES)} of {whose} best mean accuracy "
                    f"{best:.4f} all lie on or below {plateau:.4f}, the plateau the curves first flatten on: the "
                    f"runs did not leave it, so no time to target would measure training; train longer, or "
                    f"give --target"]
    lines = [f"targets: {', '.join(f'{s:.0%}' for s in TARGET_SHARES)} of {whose} best mean accuracy {best:.4f}"
             + (f", at 4 decimals only {', '.join(f'{t:g}' for t in shares)}" if len(shares) < len(TARGET_SHARES)
                else "")]
    if dropped := [t for t in shares if t <= plateau]:
        lines.append(f"dropped {', '.join(f'{t:g}' for t in dropped)}: not above {plateau:.4f}, the highest "
                     f"plateau a run's curve first flattened on; give --target to choose")
    return kept, lines


def reached_at_once(groups: list[Group], targets: list[float]) -> list[str]:
    """A warning for each target that every run reached by its first evaluation after step 0: its times are
    interpolated from the start to that evaluation, so they measure when the evaluations came, not training."""
    runs = [r for g in groups for r in g.runs]
    lines = []
    for target in targets:
        if all(max(row["val_acc"] for row in r.rows[:2]) >= target for r in runs):
            lines.append(f"every run reached {target:g} by its first evaluation after step 0: its times "
                         f"measure the evaluation schedule, not training; choose a higher --target or evaluate "
                         f"more often (trainer.eval_every_s, trainer.eval_every_steps)")
    return lines


def times_to(group: Group, target: float) -> list[Optional[float]]:
    hits = [time_to_target(run.rows, target) for run in group.runs]
    return [hit["train_time_s"] if hit else None for hit in hits]


def eval_interval(group: Group) -> Optional[float]:
    """The median training time between two evaluations, over the group's runs: what time to target is
    interpolated across."""
    gaps = np.concatenate([np.diff([row["train_time_s"] for row in run.rows]) for run in group.runs])
    return float(np.median(gaps)) if len(gaps) else None


def ratio_spread(num: MeanStd, den: MeanStd) -> MeanStd:
    """num/den with its first-order (delta-method) standard deviation from the two spreads."""
    (a, sa), (b, sb) = num, den
    ratio = a / b
    if sa is None and sb is None:
        return ratio, None
    return ratio, ratio * math.hypot((sa or 0.0) / a, (sb or 0.0) / b)


def welch_p(base: list[float], times: list[float]) -> Optional[float]:
    """The two-sided p-value of Welch's t-test that vanilla's and this arm's mean times are equal (seeds
    as independent samples): it weighs the spread against the number of seeds, as the spread alone cannot.
    None under 2 seeds an arm, or where the test is undefined (every time of both arms the same)."""
    if min(len(base), len(times)) < 2:
        return None
    with warnings.catch_warnings():  # nearly constant times: the test is still decided, by a large t
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(base, times, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def flop_rate(group: Group) -> MeanStd:
    """The model TFLOP/s each run achieved (flops_per_step x steps / train_time_s), mean and std over seeds;
    (None, None) where a record lacks flops_per_step (older records)."""
    rates = [r.summary["flops_per_step"] * r.summary["steps"] / r.summary["train_time_s"] / 1e12
             for r in group.runs if r.summary.get("flops_per_step") and r.summary.get("train_time_s")]
    return mean_std(rates) if rates and len(rates) == len(group.runs) else (None, None)


def incomplete_note(runs: list[Run]) -> str:
    statuses = [run.status for run in runs if run.status != COMPLETED]
    return ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))


def group_stats(group: Group, groups: list[Group], targets: list[float]) -> dict:
    """One table row as numbers: what the CSV holds and the terminal and markdown tables format."""
    s = group.first
    final = mean_std([r.summary["final_val_acc"] for r in group.runs])
    best = mean_std([r.summary["best_val_acc"] for r in group.runs])
    losses = [r.summary.get("final_val_loss") for r in group.runs]  # older records lack it
    loss = mean_std(losses) if None not in losses else (None, None)
    step_ms = [1e3 * r.summary["train_time_s"] / r.summary["steps"] for r in group.runs if r.summary.get("steps")]
    step_ms = mean_std(step_ms) if len(step_ms) == len(group.runs) else (None, None)
    tflops = flop_rate(group)
    row = {"arm": group.arm, "method": group.method, "frac": s["frac"],
           "exit_layer": s["exit_layer"] if "exit_layer" in group.knobs else None, "setting": group.label,
           "runs": len(group.runs) + len(group.repeats), "seeds": len(group.runs),
           "incomplete": incomplete_note(group.runs), "eval_interval_s": eval_interval(group),
           "ms_per_step_mean": step_ms[0], "ms_per_step_std": step_ms[1], "tflops_mean": tflops[0],
           "tflops_std": tflops[1], "flop_rate_vs_vanilla": None,
           "final_acc_mean": final[0], "final_acc_std": final[1], "best_acc_mean": best[0], "best_acc_std": best[1],
           "final_loss_mean": loss[0], "final_loss_std": loss[1]}
    reference = reference_for(group, groups)
    if reference is not None and tflops[0] and (base_rate := flop_rate(reference)[0]):
        row["flop_rate_vs_vanilla"] = tflops[0] / base_rate
    for target in targets:
        times = times_to(group, target)
        reached = [t for t in times if t is not None]
        time = mean_std(reached) if reached and len(reached) == len(times) else (None, None)
        speedup, p = (None, None), None
        if group is reference and time[0] is not None:
            speedup = (1.0, None)
        elif reference is not None and time[0]:  # a zero time (reached at step 0) has no ratio
            base = times_to(reference, target)
            if None not in base and (base_time := mean_std(base))[0] > 0:
                speedup, p = ratio_spread(base_time, time), welch_p(base, reached)
        row.update({f"reached_{target:g}": len(reached), f"time_to_{target:g}_mean": time[0],
                    f"time_to_{target:g}_std": time[1], f"speedup_{target:g}": speedup[0],
                    f"speedup_{target:g}_std": speedup[1], f"speedup_{target:g}_p": p,
                    f"speedup_{target:g}_significant": None if speedup[0] is None or group is reference
                    else p is not None and p < SIGNIFICANCE})
    return row


# ---------------------------------------------------------------------------------------------
# the table: rich on the terminal, the same cells in markdown, the numbers in CSV


def plus_minus(mean: float, std: Optional[float], digits: int) -> str:
    return f"{mean:.{digits}f}" + (f"±{std:.{digits}f}" if std is not None else "")


def time_digits(value: float) -> int:
    """Decimals for seconds: 12.3, 5.04."""
    return 1 if value >= 10 else 2


def columns(row: dict, targets: list[float]) -> dict[str, str]:
    """The row's cells by header, in the table's order (the setting last)."""
    notes = [note for note in (f"{row['runs']} runs" if row["runs"] > row["seeds"] else "", row["incomplete"]) if note]
    interval = row["eval_interval_s"]
    out = {"arm": row["arm"], "seeds": str(row["seeds"]) + (f" ({', '.join(notes)})" if notes else ""),
           "final acc": plus_minus(row["final_acc_mean"], row["final_acc_std"], 3),
           "best acc": plus_minus(row["best_acc_mean"], row["best_acc_std"], 3),
           "final loss": "—" if row["final_loss_mean"] is None else
           plus_minus(row["final_loss_mean"], row["final_loss_std"], 3),
           "eval every": "—" if interval is None else f"{interval:.{time_digits(interval)}f} s"}
    step_ms = row["ms_per_step_mean"]
    out["ms/step"] = "—" if step_ms is None else plus_minus(step_ms, row["ms_per_step_std"],
                                                            0 if step_ms >= 100 else time_digits(step_ms))
    for target in targets:
        reached, mean = row[f"reached_{target:g}"], row[f"time_to_{target:g}_mean"]
        if mean is not None:
            out[f"time to {target:g}"] = plus_minus(mean, row[f"time_to_{target:g}_std"], time_digits(mean))
        else:
            out[f"time to {target:g}"] = f"{reached}/{row['seeds']} reached" if reached else "not reached"
    for target in targets:
        speedup = row[f"speedup_{target:g}"]
        if speedup is None:
            cell = "—"
        elif row[f"speedup_{target:g}_significant"] is None:
            cell = "baseline"
        else:
            cell = plus_minus(speedup, row[f"speedup_{target:g}_std"], 2) + "×" + \
                ("" if row[f"speedup_{target:g}_significant"] else " n.s.")
        out[f"speedup {target:g}"] = cell
    out["setting"] = row["setting"]
    return out


def caption_lines(groups: list[Group], rows: list[dict], targets_note: list[str]) -> list[str]:
    lines = list(targets_note)
    if any(key.startswith("time_to_") for key in rows[0]):  # no targets, no times and speedups to explain
        lines += [
            "time: training seconds (train_time_s) to the target, mean±std over seeds, linearly interpolated between "
            "the first evaluation at or above it and the one before (eval every: the median time between "
            "evaluations)",
            f"speedup: vanilla's mean time / this arm's (± the seeds' spread, propagated), against vanilla of the "
            f"same setting; n.s.: not significant, Welch's t-test on the two arms' times gives p ≥ {SIGNIFICANCE:g} "
            f"(or an arm has a single seed)"]
    lines.append("ms/step: training time per step (selection included): a time to target is the steps to it times "
                 "this, so a speedup comes from fewer steps, cheaper steps, or both")
    single = [g.name for g in groups if len(g.runs) < 2]
    if single:
        lines.append(f"1 seed: no spread, not a result: {', '.join(single)}")
    if any(r["incomplete"] for r in rows):
        lines.append("runs that did not complete are included (--include-incomplete); seeds says how many")
    uneven = [f"{r['arm']} ({r['ms_per_step_std'] / r['ms_per_step_mean']:.0%})" for r in rows
              if r["ms_per_step_std"] and r["ms_per_step_std"] > UNEVEN_STEPS * r["ms_per_step_mean"]]
    if uneven:  # the same step, timed differently: the machine changed under the runs, not the method
        lines.append(f"uneven: ms/step varies between seeds (std/mean) of {', '.join(uneven)}: the machine's load "
                     f"or clock changed between runs, and their times compare the machine too")
    changed = [f"{r['arm']}{' ' + r['setting'] if r['setting'] else ''} ({r['flop_rate_vs_vanilla']:.2f}x: "
               f"{r['tflops_mean']:.3g} TFLOP/s)" for g, r in zip(groups, rows)
               if g.first.get("device") == "cpu" and r["flop_rate_vs_vanilla"]
               and not 1 / FLOP_RATE_TOLERANCE <= r["flop_rate_vs_vanilla"] <= FLOP_RATE_TOLERANCE]
    if changed:  # one machine runs every arm's model at about one rate: a different rate is a different machine
        lines.append(f"machine: the FLOP rate (model TFLOP/s) of {', '.join(changed)} differs from vanilla's of the "
                     f"same setting by more than {FLOP_RATE_TOLERANCE:g}x: the machine's load changed between the "
                     f"arms, and their speedups compare the machine too; interleave the arms (seed first in the "
                     f"sweep's overrides) and run again")
    passes = [run.summary["data_passes"] for g in groups for run in g.runs if "data_passes" in run.summary]
    if passes:  # a pre-training comparison reads its corpus about once; many passes measure memorisation
        lines.append(f"data: the runs read their training data {min(passes):,.1f} to {max(passes):,.1f} times "
                     f"(data_passes)")
    return lines


def new_table(headers: list[str]) -> Table:
    # two spaces between columns (the divider and a right padding), none at the edges
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for header in headers:
        table.add_column(header, no_wrap=True, justify="left" if header in ("arm", "set", "setting") else "right")
    return table


def fitted_tables(body: list[dict[str, str]], fixed: list[str], rest: list[str], console: Console) -> list[Table]:
    """The columns in tables no wider than the console, each repeating the `fixed` columns (one line per arm)."""
    def table(headers: list[str]) -> Table:
        t = new_table(headers)
        for cells in body:
            t.add_row(*(escape(cells[h]) for h in headers))  # a setting like data.paths=[a.txt] is not markup
        return t

    def width(headers: list[str]) -> int:
        return console.measure(table(headers), options=console.options.update_width(10_000)).maximum

    parts: list[list[str]] = []
    for header in rest:
        if parts and width(fixed + parts[-1] + [header]) <= console.width:
            parts[-1].append(header)
        else:
            parts.append([header])
    return [table(fixed + part) for part in parts]


def print_table(rows: list[dict], targets: list[float], caption: list[str], console: Console) -> list[list[str]]:
    """The table on the console, split into parts that fit its width, the caption below; returns the full
    table's lines (header first) for markdown."""
    body = [columns(row, targets) for row in rows]
    headers = [h for h in body[0] if h != "setting" or any(cells["setting"] for cells in body)]
    tables = fitted_tables(body, ["arm", "seeds"], headers[2:], console)
    if len(tables) > 1 and "setting" in headers:
        # the setting would stand in a table of its own: name each setting by a letter, listed below
        letters = {s: chr(ord("A") + i) for i, s in enumerate(dict.fromkeys(cells["setting"] for cells in body))}
        for cells in body:
            cells["set"] = letters[cells["setting"]]
        tables = fitted_tables(body, ["arm", "set", "seeds"], headers[2:-1], console)
        caption = caption + [f"set {letter}: {setting}" for setting, letter in letters.items()]
    console.print(Text("time to target accuracy (interpolated between evaluations)", style="bold"))
    for table in tables:
        console.print(table)
        console.print()
    for line in caption:
        console.print(Text(line), overflow="fold")
    return [headers] + [[cells[h] for h in headers] for cells in body]


def write_markdown(lines: list[list[str]], caption: list[str], path: Path) -> None:
    def md(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    header, *body = lines
    path.write_text("\n".join([md(header), md(["---"] * len(header)), *map(md, body), "",
                               *(f"- {line}" for line in caption)]) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# plots


def draw_mean(ax, curves: list[tuple[np.ndarray, np.ndarray]], label: str, color, style: str = "-") -> None:
    """Mean over runs at every x where any run has a point (each run counts within its own span, linearly
    interpolated between its points), and the min-max band around it."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    ys = np.stack([np.interp(grid, x, y, left=np.nan, right=np.nan) for x, y in curves])
    present = ~np.isnan(ys)  # every grid point is some run's own point, so never all missing
    mean = np.where(present, ys, 0.0).sum(axis=0) / present.sum(axis=0)
    ax.plot(grid, mean, style, color=color, label=label, lw=1.5, marker="o" if len(grid) == 1 else None)
    if len(curves) > 1:
        ax.fill_between(grid, np.fmin.reduce(ys), np.fmax.reduce(ys), color=color, alpha=0.2, lw=0)


def series(rows: list[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    kept = [r for r in rows if r.get(y_key) is not None]
    return np.array([r[x_key] for r in kept], dtype=float), np.array([r[y_key] for r in kept], dtype=float)


def colors(n: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(n)]


def plot_accuracy(groups: list[Group], targets: list[float], x_key: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group, color in zip(groups, colors(len(groups))):
        draw_mean(ax, [series(r.rows, x_key, "val_acc") for r in group.runs], group.name, color)
    for target in targets:
        ax.axhline(target, ls="--", lw=0.8, color="0.5")
        ax.text(1.0, target, f" {target:g}", transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="0.4")
    ax.set(xlabel=xlabel, ylabel="validation accuracy",
           title="mean over seeds, band: min to max" if any(len(g.runs) > 1 for g in groups) else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def exit_layers(runs: list[Run]) -> list[int]:
    return sorted({int(m[2]) for r in runs for row in r.diagnostics for k in row if (m := DIAGNOSTIC_KEY.fullmatch(k))})


def plot_diagnostics(groups: list[Group], path: Path) -> bool:
    """Spearman and top-frac overlap of each exit's score with the exact loss, and the mean score kept
    vs dropped, against training time: one row per group that has them. False when no run recorded
    diagnostics (diagnostics.every_n_steps unset): kept and dropped scores alone are no diagnostics."""
    has_probe = [any(r.diagnostics for r in g.runs) for g in groups]
    if not any(has_probe):
        return False
    has_scores = [any(row.get("score_kept") is not None for r in g.runs for row in r.rows) for g in groups]
    panels = ["spearman", "overlap"] + ["score"] * any(has_scores)
    shown = [g for g, probe, scores in zip(groups, has_probe, has_scores) if probe or scores]
    layers = exit_layers([r for g in shown for r in g.runs])
    layer_color = dict(zip(layers, colors(len(layers))))
    titles = {"spearman": "Spearman: exit score vs exact loss", "overlap": "overlap with the exact top-frac set",
              "score": "mean score: kept (—) vs dropped (--)"}
    fig, axes = plt.subplots(len(shown), len(panels), figsize=(4.2 * len(panels), 3 * len(shown)), squeeze=False)
    for group, row_axes in zip(shown, axes):
        for panel, ax in zip(panels, row_axes):
            if panel == "score":
                draw_mean(ax, [series(r.rows, "train_time_s", "score_kept") for r in group.runs], "kept", "C0")
                draw_mean(ax, [series(r.rows, "train_time_s", "score_dropped") for r in group.runs], "dropped", "C0",
                          "--")
            else:
                for k in layers:
                    draw_mean(ax, [series(r.diagnostics, "train_time_s", f"{panel}_k{k}") for r in group.runs],
                              f"exit {k}", layer_color[k])
                ax.set_ylim(-1.05 if panel == "spearman" else -0.05, 1.05)
            ax.set_title(f"{group.name}\n{titles[panel]}", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.set_xlabel("training time (s)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize="x-small")
            else:  # e.g. vanilla scores nothing, so it has no kept and dropped scores
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not in this group's records", ha="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the command


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        raise CompareError(message)


def target_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a validation accuracy in (0, 1]; use e.g. --target 0.64")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = Parser(prog="sift-compare", description="Compare sift-train runs: time to target accuracy, speedup "
                                                     "against vanilla, accuracy and selection-diagnostics plots.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders or sweep folders (searched recursively)")
    parser.add_argument("--target", type=target_value, action="append", metavar="ACC",
                        help="target validation accuracy, repeatable (default: 90/95/99%% of vanilla's best, "
                             "those above the plateau every run's curve first flattens on)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table's numbers as CSV")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for the plots (default: the first PATH)")
    parser.add_argument("--tuned", action="append", default=[], metavar="KEY",
                        help="a config key each arm tuned for itself, e.g. trainer.optimizer.lr (repeatable): "
                             "left out of the grouping, so every arm is compared with vanilla at its own value")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="keep runs that were interrupted or preempted (marked in the table and CSV)")
    return parser.parse_args(argv)


def compare(args: argparse.Namespace, console: Optional[Console] = None) -> None:
    runs = load_runs(args.paths, args.include_incomplete)
    check_tuned(runs, args.tuned)
    groups = group_runs(runs, frozenset(args.tuned))
    for note in filter(None, map(seed_note, groups)):
        print(f"note: {note}", file=sys.stderr)
    if args.target:
        targets, targets_note = sorted(set(args.target)), ["targets: given with --target"]
    else:
        targets, targets_note = default_targets(groups)
    at_once = reached_at_once(groups, targets)
    for line in at_once:
        warn(line)
    rows = [group_stats(g, groups, targets) for g in groups]
    caption = caption_lines(groups, rows, targets_note + [f"warning: {line}" for line in at_once])
    console = console or Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
    lines = print_table(rows, targets, caption, console)
    written = []
    if args.csv:
        write_csv(rows, args.csv)
        written.append(args.csv)
    if args.markdown:
        write_markdown(lines, caption, args.markdown)
        written.append(args.markdown)
    out = args.out or Path(args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(groups, targets, "train_time_s", "training time (s)", out / "accuracy_vs_time.png")
    plot_accuracy(groups, targets, "samples_backpropagated", "samples back-propagated", out / "accuracy_vs_samples.png")
    written += [out / "accuracy_vs_time.png", out / "accuracy_vs_samples.png"]
    if plot_diagnostics(groups, out / "diagnostics.png"):
        written.append(out / "diagnostics.png")
    print("wrote " + ", ".join(map(str, written)))


def main(argv: Optional[list[str]] = None) -> None:
    try:
        compare(parse_args(argv))
    except (CompareError, OSError) as err:
        print(f"sift-compare: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
