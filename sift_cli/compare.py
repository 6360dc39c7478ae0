"""`sift-compare`: how much sooner does SIFT reach a target accuracy than vanilla training?

Reads run folders only (summary.json, metrics.jsonl, the optional diagnostics.jsonl) and never
imports training code. Runs that differ only in their seed form a group; each group gets one row:
final and best validation accuracy, training time to each target (over seeds) and the speedup
against the vanilla group of the same setting. Plots go beside the table.

    sift-compare outputs/multirun/2025-01-01_12-00-00 --target 0.3 --csv table.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from sift_cli.records import DIAGNOSTICS, METRICS, SUMMARY, read_metrics, time_to_target  # noqa: E402

# config keys that do not change what a run learns, so runs differing only there are repeats
IGNORED = {"seed", "name", "tags", "targets", "trainer.progress", "trainer.device", "trainer.eval_batch_size",
           "data.cache_dir"}
IGNORED_PREFIXES = ("logger.", "hydra.", "diagnostics.")  # probing pauses the clock and changes nothing
# the selection knobs, and the ones each method uses: frac=1.0 is vanilla whatever criterion says
SELECTION = ("frac", "exit_layer", "criterion", "trainer.batch_mode")
USED_KNOBS = {"vanilla": (), "random": ("frac", "trainer.batch_mode")}
SIFT_KNOBS = ("frac", "exit_layer", "trainer.batch_mode")  # the criterion is in the method's name
TARGET_SHARES = (0.90, 0.95, 0.99)  # default targets: shares of vanilla's best mean accuracy
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


@dataclass
class Group:
    method: str
    setting: dict  # everything else that shapes training, flattened to dotted keys
    runs: list[Run]
    label: str = ""  # what tells this group apart from the others, e.g. "model=bert_small"

    @property
    def first(self) -> dict:
        return self.runs[0].summary


# ---------------------------------------------------------------------------------------------
# finding and reading runs


def find_run_folders(paths: list[str]) -> list[Path]:
    """Every run folder (one holding summary.json or metrics.jsonl) under each path, each once."""
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise CompareError(f"{name} does not exist; give run folders or sweep folders of sift-train")
        if not path.is_dir():
            raise CompareError(f"{name} is not a folder; give run folders or sweep folders of sift-train")
        records = sorted(path.rglob(SUMMARY)) + sorted(path.rglob(METRICS))
        folders = [p.parent.resolve() for p in records]
        if not folders:
            raise CompareError(f"no runs under {name}: a run folder holds {SUMMARY} and {METRICS}")
        found.update(dict.fromkeys(folders))
    return list(found)


def load_run(folder: Path) -> Optional[Run]:
    """The run's records, or None (with a warning) when they are incomplete or corrupt."""
    if not (folder / SUMMARY).exists():
        warn(f"skipping {folder}: {METRICS} but no {SUMMARY} (still running, or stopped before its end)")
        return None
    if not (folder / METRICS).exists():
        warn(f"skipping {folder}: {SUMMARY} but no {METRICS}")
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


def load_runs(paths: list[str]) -> list[Run]:
    runs = [run for run in map(load_run, find_run_folders(paths)) if run is not None]
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


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def group_key(run: Run, tuned: frozenset = frozenset()) -> tuple[str, dict, dict]:
    """(method, the selection knobs it uses, the setting): runs equal in all three differ only by seed.

    Keys in `tuned` (e.g. a learning rate each arm chose for itself) are left out of the setting, so
    each arm is compared with vanilla at vanilla's own value."""
    s = run.summary
    flat = flatten(s["config"])
    knobs = {k: flat.get(k) for k in USED_KNOBS.get(s["method"], SIFT_KNOBS)}
    ignored = IGNORED | tuned | set(SELECTION)
    setting = {k: v for k, v in flat.items() if k not in ignored and not k.startswith(IGNORED_PREFIXES)}
    # the choice names and the device the run actually used (the config may say "auto")
    setting.update(model=s.get("model"), data=s.get("data"), device=s.get("device"))
    return s["method"], knobs, setting


def group_runs(runs: list[Run], tuned: frozenset = frozenset()) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        method, knobs, setting = group_key(run, tuned)
        key = json.dumps([method, knobs, setting], sort_keys=True, default=str)
        groups.setdefault(key, Group(method, setting, [])).runs.append(run)
    ordered = sorted(groups.values(), key=lambda g: (g.method != "vanilla", g.method, -g.first["frac"],
                                                     g.first["exit_layer"], str(sorted(g.setting.items()))))
    label_groups(ordered)
    return ordered


def label_groups(groups: list[Group]) -> None:
    """Name the setting keys that differ between groups; a differing model (data) name stands for its keys."""
    keys = sorted({k for g in groups for k in g.setting})
    varying = [k for k in keys if len({json.dumps(g.setting.get(k), default=str) for g in groups}) > 1]
    named = [k for k in ("model", "data") if k in varying]
    shown = [k for k in varying if not any(k.startswith(f"{n}.") for n in named)]
    for g in groups:
        g.label = " ".join(f"{k}={g.setting.get(k)}" for k in shown)


def reference_for(group: Group, groups: list[Group]) -> Optional[Group]:
    """The vanilla group with the same setting: the baseline of this group's speedup."""
    return next((g for g in groups if g.method == "vanilla" and g.setting == group.setting), None)


def seed_note(group: Group) -> Optional[str]:
    seeds = [r.summary["seed"] for r in group.runs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if not repeated:
        return None
    why = " (frac=1.0 trains the same way whatever criterion and exit_layer say)" if group.method == "vanilla" else ""
    return (f"{group_name(group)}: seed {', '.join(map(str, repeated))} ran more than once{why}; "
            f"each run counts as a repeat")


# ---------------------------------------------------------------------------------------------
# the numbers


MeanStd = tuple[float, Optional[float]]  # the std is None for a single value


def mean_std(values: list[float]) -> MeanStd:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def default_targets(groups: list[Group]) -> tuple[list[float], str]:
    """90, 95 and 99% of vanilla's best mean accuracy (of the best group's without vanilla)."""
    vanilla = [g for g in groups if g.method == "vanilla"]
    pool = vanilla or groups
    best = max(mean_std([r.summary["best_val_acc"] for r in g.runs])[0] for g in pool)
    # floored to 4 decimals: a printed target never exceeds the accuracy it was derived from
    targets = sorted({math.floor(best * share * 1e4) / 1e4 for share in TARGET_SHARES} - {0.0})
    whose = "vanilla's" if vanilla else "the best group's (no vanilla runs)"
    return targets, f"targets: {', '.join(f'{s:.0%}' for s in TARGET_SHARES)} of {whose} best mean accuracy {best:.4f}"


def times_to(group: Group, target: float) -> list[Optional[float]]:
    hits = [time_to_target(run.rows, target) for run in group.runs]
    return [hit["train_time_s"] if hit else None for hit in hits]


def ratio_spread(num: MeanStd, den: MeanStd) -> MeanStd:
    """num/den with its first-order (delta-method) standard deviation from the two spreads."""
    (a, sa), (b, sb) = num, den
    ratio = a / b
    if sa is None and sb is None:
        return ratio, None
    return ratio, ratio * math.hypot((sa or 0.0) / a, (sb or 0.0) / b)


def group_stats(group: Group, groups: list[Group], targets: list[float]) -> dict:
    """One table row as numbers: what the CSV holds and the rich/markdown tables format."""
    s = group.first
    uses = USED_KNOBS.get(group.method, SIFT_KNOBS)
    final = mean_std([r.summary["final_val_acc"] for r in group.runs])
    best = mean_std([r.summary["best_val_acc"] for r in group.runs])
    row = {"method": group.method, "frac": s["frac"], "exit_layer": s["exit_layer"] if "exit_layer" in uses else None,
           "setting": group.label, "runs": len(group.runs), "seeds": len({r.summary["seed"] for r in group.runs}),
           "final_acc_mean": final[0], "final_acc_std": final[1], "best_acc_mean": best[0], "best_acc_std": best[1]}
    reference = reference_for(group, groups)
    for target in targets:
        times = times_to(group, target)
        reached = [t for t in times if t is not None]
        time = mean_std(reached) if reached and len(reached) == len(times) else (None, None)
        speedup = (None, None)
        if group is reference and time[0] is not None:
            speedup = (1.0, None)
        elif reference is not None and time[0]:  # a zero time (reached at step 0) has no ratio
            base = times_to(reference, target)
            if None not in base and (base_time := mean_std(base))[0] > 0:
                speedup = ratio_spread(base_time, time)
        row.update({f"reached_{target:g}": len(reached), f"time_to_{target:g}_mean": time[0],
                    f"time_to_{target:g}_std": time[1], f"speedup_{target:g}": speedup[0],
                    f"speedup_{target:g}_std": speedup[1]})
    return row


# ---------------------------------------------------------------------------------------------
# the table: rich on the terminal, the same cells in markdown, the numbers in CSV


def plus_minus(mean: float, std: Optional[float], digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def cells(row: dict, targets: list[float], with_setting: bool) -> list[str]:
    seeds = str(row["seeds"]) + (f" ({row['runs']} runs)" if row["runs"] > row["seeds"] else "")
    out = [row["method"], f"{row['frac']:g}", "—" if row["exit_layer"] is None else str(row["exit_layer"]), seeds,
           plus_minus(row["final_acc_mean"], row["final_acc_std"], 4),
           plus_minus(row["best_acc_mean"], row["best_acc_std"], 4)]
    for target in targets:
        reached, mean = row[f"reached_{target:g}"], row[f"time_to_{target:g}_mean"]
        if mean is not None:
            digits = 1 if mean >= 10 else 2
            out.append(plus_minus(mean, row[f"time_to_{target:g}_std"], digits) + " s")
        else:
            out.append(f"{reached}/{row['runs']} reached" if reached else "not reached")
    for target in targets:
        speedup = row[f"speedup_{target:g}"]
        if row["method"] == "vanilla" and speedup is not None:
            out.append("1 (baseline)")
        else:
            out.append("—" if speedup is None else plus_minus(speedup, row[f"speedup_{target:g}_std"], 2) + "×")
    return out + ([row["setting"]] if with_setting else [])


def headers(targets: list[float], with_setting: bool) -> list[str]:
    return (["method", "frac", "exit layer", "seeds", "final val acc", "best val acc"]
            + [f"time to {t:g}" for t in targets] + [f"speedup at {t:g}" for t in targets]
            + (["setting"] if with_setting else []))


def print_table(rows: list[dict], targets: list[float], caption: str) -> list[list[str]]:
    with_setting = any(r["setting"] for r in rows)
    table = Table(title="time to target accuracy", caption=caption, caption_justify="left")
    for i, header in enumerate(headers(targets, with_setting)):
        table.add_column(header, justify="left" if i == 0 or header == "setting" else "right")
    body = [cells(r, targets, with_setting) for r in rows]
    for line in body:
        table.add_row(*map(escape, line))  # a setting like data.paths=[a.txt] is not markup
    # piped output gets the width a table needs, not rich's default of 80 columns
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return [headers(targets, with_setting)] + body


def write_markdown(lines: list[list[str]], path: Path) -> None:
    def md(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    header, *body = lines
    path.write_text("\n".join([md(header), md(["---"] * len(header)), *map(md, body)]) + "\n")


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


def group_name(group: Group) -> str:
    s = group.first
    name = {"vanilla": "vanilla", "random": f"random f{s['frac']:g}"}.get(
        group.method, f"{group.method} k{s['exit_layer']} f{s['frac']:g}")
    return f"{name} {group.label}".strip()


def colors(n: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(n)]


def plot_accuracy(groups: list[Group], targets: list[float], x_key: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group, color in zip(groups, colors(len(groups))):
        draw_mean(ax, [series(r.rows, x_key, "val_acc") for r in group.runs], group_name(group), color)
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
    vs dropped, against training time: one row per group that has them. False when no run has any."""
    has_probe = [any(r.diagnostics for r in g.runs) for g in groups]
    has_scores = [any(row.get("score_kept") is not None for r in g.runs for row in r.rows) for g in groups]
    panels = [p for p, present in (("spearman", any(has_probe)), ("overlap", any(has_probe)),
                                   ("score", any(has_scores))) if present]
    shown = [g for g, probe, scores in zip(groups, has_probe, has_scores) if probe or scores]
    if not shown:
        return False
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
            ax.set_title(f"{group_name(group)}\n{titles[panel]}", fontsize=9)
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
                        help="target validation accuracy, repeatable (default: 90/95/99%% of vanilla's best)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table's numbers as CSV")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for the plots (default: the first PATH)")
    parser.add_argument("--tuned", action="append", default=[], metavar="KEY",
                        help="a config key each arm tuned for itself, e.g. trainer.optimizer.lr (repeatable): "
                             "left out of the grouping, so every arm is compared with vanilla at its own value")
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> None:
    groups = group_runs(load_runs(args.paths), frozenset(args.tuned))
    for note in filter(None, map(seed_note, groups)):
        print(f"note: {note}", file=sys.stderr)
    if args.target:
        targets, caption = sorted(set(args.target)), "targets: given with --target"
    else:
        targets, caption = default_targets(groups)
    caption += ("\ntime: training seconds (train_time_s) to the first evaluation at or above the target, mean ± std"
                " over seeds\nspeedup: vanilla's mean time / this group's, against vanilla of the same setting")
    rows = [group_stats(g, groups, targets) for g in groups]
    lines = print_table(rows, targets, caption)
    written = []
    if args.csv:
        write_csv(rows, args.csv)
        written.append(args.csv)
    if args.markdown:
        write_markdown(lines, args.markdown)
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
