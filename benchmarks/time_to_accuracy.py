"""Time to accuracy: vanilla, SIFT (loss, entropy; with selection windows), random, exact selection and Composer's
SelectiveBackprop on equal wall-clock budgets.

Every run is the real CLI, `python -m sift_cli.train --multirun experiment=EXPERIMENT ...`, one job per
call, with `logger=none` and its own folder under --runs-dir. Two stages:

1. learning-rate sweep: every arm at every rate of --lrs, one seed (--sweep-seed);
2. comparison: every arm at its own best rate (highest best_val_acc in stage 1), each of --seeds.

The sweep seed is not one of the comparison seeds, so no arm's figures reuse the run its rate was
picked on. Jobs run interleaved (round r runs the arms in an order rotated by r), so a change in the
machine's load touches every arm alike. Times are the trainer's training clock (`train_time_s`,
evaluation excluded) at the first evaluation that reached a target; ratios pair runs of one seed.

    python benchmarks/time_to_accuracy.py                      # conf/experiment/tta_docstrings.yaml
    python benchmarks/time_to_accuracy.py --quick              # a minute-long smoke test of the script
    python benchmarks/time_to_accuracy.py --runs-dir DIR       # resume: finished runs are kept, or trained
                                                               # on where a budget is raised
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from hydra.utils import get_class

from common import app_config, command_line, machine, markdown_table, report_path
from sift_cli.checkpoint import extends, read_run
from sift_cli.records import COMPLETED, SUMMARY, read_metrics, run_status, time_to_target

REPO = Path(__file__).resolve().parents[1]
# the overrides that make each arm; {depth} is the model's number of encoder layers
ARMS = {
    "vanilla": ["frac=1.0"],
    "sift-loss": ["frac=0.5", "criterion=loss", "exit_layer=1"],
    "sift-entropy": ["frac=0.5", "criterion=entropy", "exit_layer=1"],
    "random": ["frac=0.5", "criterion=random"],
    "exact": ["frac=0.5", "criterion=loss", "exit_layer={depth}"],
    # when to select (README: When to select): vanilla steps for the first tenth of the budget, then SIFT
    "sift-loss-w0.1": ["frac=0.5", "criterion=loss", "exit_layer=1", "selection.start=0.1"],
    # SIFT in Composer's window: 50-90% of the budget, every second step
    "sift-loss-w0.5-0.9-every2": ["frac=0.5", "criterion=loss", "exit_layer=1", "selection.start=0.5",
                                  "selection.end=0.9", "selection.every=2"],
    "composer": ["arm=composer"],  # Composer's SelectiveBackprop at its defaults: the exact loss, its rule, window
}


def rotated(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


class Runner:
    """Launches one `sift-train --multirun` job per (arm, rate, seed), or finds its finished folder."""

    def __init__(self, experiment: str, runs_dir: Path, extra: list[str], depth: int, sweep_budget: float):
        self.experiment, self.runs_dir, self.extra, self.depth = experiment, runs_dir, extra, depth
        self.stage_overrides = {"sweep": [f"trainer.max_time_s={sweep_budget:g}"], "main": []}

    def folder(self, stage: str, arm: str, lr: float, seed: int) -> Path:
        return self.runs_dir / stage / f"{arm}-lr{lr:g}-s{seed}"

    def run(self, stage: str, arm: str, lr: float, seed: int) -> Path:
        folder = self.folder(stage, arm, lr, seed)
        overrides = [f"experiment={self.experiment}", *(o.format(depth=self.depth) for o in ARMS[arm]),
                     f"trainer.optimizer.lr={lr:g}", f"seed={seed}", "logger=none", "trainer.progress=false",
                     *self.extra, *self.stage_overrides[stage]]
        if run_status(folder) == COMPLETED and not raises_budget(folder, overrides):
            return folder  # finished in an earlier call, with the budget this call asks for
        command = [sys.executable, "-m", "sift_cli.train", "--multirun", *overrides,
                   f"hydra.sweep.dir={folder.parent}", f"hydra.sweep.subdir={folder.name}"]
        folder.parent.mkdir(parents=True, exist_ok=True)
        log = folder.parent / f"{folder.name}.log"
        started = time.perf_counter()
        with open(log, "a") as out:  # a run extended by a later call keeps its first part's log
            out.write(" ".join(command) + "\n")
            out.flush()
            done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0 or run_status(folder) != COMPLETED:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            sys.exit(f"time_to_accuracy: {arm} lr={lr:g} seed={seed} failed (exit {done.returncode}); "
                     f"{log}:\n{tail}")
        summary = json.loads((folder / SUMMARY).read_text())
        print(f"  {stage} {arm:>12} lr={lr:<7g} seed={seed}: best val_acc {summary['best_val_acc']:.4f}, "
              f"{summary['steps']} steps, {time.perf_counter() - started:.0f} s wall", flush=True)
        return folder


def raises_budget(folder: Path, overrides: list[str]) -> bool:
    """Whether these overrides give a finished run more steps or time: sift-train then trains it on."""
    trainer = app_config(overrides).trainer
    saved = read_run(folder)
    return saved is not None and extends(saved["config"], {"trainer": {"max_steps": trainer.max_steps,
                                                                       "max_time_s": trainer.max_time_s}})


def best_rates(runner: Runner, arms: list[str], lrs: list[float], seed: int) -> tuple[dict, list[list]]:
    """Each arm's rate with the highest best_val_acc, and the sweep's table rows."""
    for round_, lr in enumerate(lrs):
        for arm in rotated(arms, round_):
            runner.run("sweep", arm, lr, seed)
    best, rows = {}, []
    for arm in arms:
        scores = {lr: json.loads((runner.folder("sweep", arm, lr, seed) / SUMMARY).read_text())["best_val_acc"]
                  for lr in lrs}
        best[arm] = max(lrs, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
        rows.append([arm] + [f"**{scores[lr]:.4f}**" if lr == best[arm] else f"{scores[lr]:.4f}" for lr in lrs])
    return best, rows


def cell(values: list[float], reached: int, runs: int, digits: int = 1) -> str:
    """Median [min, max] of the runs that reached the target, and how many did."""
    if not values:
        return f"not reached (0/{runs})"
    text = f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"
    return text + (f" ({reached}/{runs})" if reached < runs else "")


def comparison(runner: Runner, arms: list[str], lr: dict, seeds: list[int], targets: list[float]) -> list[str]:
    runs = {(arm, seed): runner.folder("main", arm, lr[arm], seed) for arm in arms for seed in seeds}
    rows = {key: read_metrics(folder) for key, folder in runs.items()}
    summaries = {key: json.loads((folder / SUMMARY).read_text()) for key, folder in runs.items()}

    def hit(arm: str, seed: int, target: float) -> Optional[float]:
        row = time_to_target(rows[arm, seed], target)
        return row["train_time_s"] if row else None

    def ratios(arm: str, other: str, target: float) -> str:
        if other not in arms or arm == other:
            return "-"
        pairs = [(hit(arm, s, target), hit(other, s, target)) for s in seeds]
        values = [a / b for a, b in pairs if a is not None and b is not None]
        return cell(values, len(values), len(seeds), digits=2)

    header = ["arm", "lr", "steps", "ms per step", "samples back-propagated", "passes over the data",
              "final val_acc", "best val_acc"]
    table = []
    for arm in arms:
        s = [summaries[arm, seed] for seed in seeds]
        table.append([arm, f"{lr[arm]:g}", cell([x["steps"] for x in s], len(s), len(s), 0),
                      cell([1e3 * x["train_time_s"] / x["steps"] for x in s], len(s), len(s), 0),
                      cell([x["samples_backpropagated"] for x in s], len(s), len(s), 0),
                      cell([x["data_passes"] for x in s], len(s), len(s), 1),
                      cell([x["final_val_acc"] for x in s], len(s), len(s), 4),
                      cell([x["best_val_acc"] for x in s], len(s), len(s), 4)])
    text = [markdown_table(header, table)]
    # per sample: what selection buys, apart from what a step costs; per second: what the user waits for
    common = min(x["samples_backpropagated"] for x in summaries.values())
    budget = min(x["train_time_s"] for x in summaries.values())

    def acc_at(arm: str, seed: int, key: str, limit: float) -> float:
        """val_acc at the last evaluation with `key` (samples back-propagated, training seconds) within `limit`."""
        return [r for r in rows[arm, seed] if r[key] <= limit][-1]["val_acc"]

    for key, sizes, what, label in [
            ("samples_backpropagated", [common // 2, common], "Per sample back-propagated",
             "samples back-propagated (the largest N every run reached, and half of it)"),
            ("train_time_s", [budget / 4, budget / 2, 3 * budget / 4], "Per second",
             "seconds of training (a quarter, half and three quarters of the budget; the end is final val_acc)")]:
        text += ["", f"**{what}**: val_acc at the last evaluation within the first N {label}", "",
                 markdown_table(["arm"] + [f"N = {n:,.0f}" for n in sizes],
                                [[arm] + [cell([acc_at(arm, s, key, n) for s in seeds], len(seeds), len(seeds), 4)
                                          for n in sizes] for arm in arms])]
    for target in targets:
        target_rows = []
        for arm in arms:
            times = [t for t in (hit(arm, seed, target) for seed in seeds) if t is not None]
            target_rows.append([arm, cell(times, len(times), len(seeds)), ratios(arm, "vanilla", target),
                                ratios(arm, "random", target)])
        text += ["", f"**Target val_acc {target:g}**: training seconds to the first evaluation at or above it",
                 "", markdown_table(["arm", "seconds", "x vanilla (same seed)", "x random (same seed)"],
                                    target_rows)]
    return text


def sift_compare(main_dir: Path, targets: list[float], plots: Path, report: Path) -> list[str]:
    """The product's own reading of the comparison runs: sift-compare's table, and its plots in `plots`."""
    plots.mkdir(parents=True, exist_ok=True)
    table = plots / "sift_compare.md"
    command = [sys.executable, "-m", "sift_cli.compare", str(main_dir), *(f"--target={t:g}" for t in targets),
               "--markdown", str(table), "--out", str(plots)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return ["", f"sift-compare failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1]}"]
    return ["", "## The same runs read by sift-compare (mean ± std over seeds)", "",
            f"`sift-compare {main_dir} {' '.join(f'--target={t:g}' for t in targets)}`", "", table.read_text().strip(),
            "", f"![validation accuracy against training time]"
                f"({os.path.relpath(plots / 'accuracy_vs_time.png', report.parent)})"]



def described(node) -> str:
    """`Target(key=value, ...)`: a model or data config in one line, whatever its family."""
    keys = ", ".join(f"{k}={v}" for k, v in node.items() if k not in ("_target_", "cache_dir", "tokenizer"))
    return f"{node._target_.rsplit('.', 1)[-1]}({keys})"

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="tta_docstrings", help="conf/experiment file: the shared setup")
    parser.add_argument("--arms", default="vanilla,sift-loss,sift-entropy,random,exact",
                        help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--lrs", default="1e-3,2e-3", help="rates swept per arm (one rate: no sweep)")
    parser.add_argument("--sweep-budget", type=float, help="training seconds per sweep run (default: half "
                                                           "the comparison's trainer.max_time_s)")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--runs-dir", type=Path, help="run folders (default outputs/bench-tta/EXPERIMENT-TIME); "
                                                      "an existing one resumes")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/time_to_accuracy.md; "
                                                 "with --quick outputs/benchmarks/time_to_accuracy-quick.md)")
    parser.add_argument("--plots", type=Path, help="folder for sift-compare's plots (default: beside the report)")
    parser.add_argument("--quick", action="store_true", help="20 s per run, one rate, one seed: checks the script")
    parser.add_argument("overrides", nargs="*", help="extra sift-train overrides for every run, e.g. "
                                                     "trainer.max_time_s=60")
    args = parser.parse_args()
    arms, lrs = args.arms.split(","), [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.quick:
        lrs, seeds = lrs[1:2] or lrs, seeds[:1]
        args.overrides = ["trainer.max_time_s=20", "trainer.eval_every_s=5", *args.overrides]
    cfg = app_config([f"experiment={args.experiment}", *args.overrides])
    depth = getattr(get_class(cfg.model._target_), "depth", None) or cfg.model.num_layers  # ResNet: 4 stages
    runs_dir = args.runs_dir or REPO / "outputs" / "bench-tta" / f"{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = report_path("time_to_accuracy", args.quick, args.out)
    sweep_budget = args.sweep_budget or cfg.trainer.max_time_s / 2
    runner = Runner(args.experiment, runs_dir, args.overrides, depth, sweep_budget)
    print(f"runs in {runs_dir}: {len(arms)} arms x ({len(lrs) if len(lrs) > 1 else 0} sweep rates + "
          f"{len(seeds)} seeds), {cfg.trainer.max_time_s:g} s of training each", flush=True)

    if len(lrs) > 1:
        lr, sweep_rows = best_rates(runner, arms, lrs, args.sweep_seed)
    else:
        lr, sweep_rows = {arm: lrs[0] for arm in arms}, []
    for round_, seed in enumerate(seeds):
        for arm in rotated(arms, round_):
            runner.run("main", arm, lr[arm], seed)
    # from the summaries, so that a call that resumed or extended runs reports them whole
    summaries = [json.loads(p.read_text()) for p in runs_dir.glob("*/*/" + SUMMARY)]
    elapsed = sum(s["wall_time_s"] for s in summaries)
    continued = sum(1 for s in summaries if s.get("restarts"))

    t, d = cfg.trainer, cfg.data
    text = [
        "# Time to accuracy: SIFT against vanilla and random selection", "",
        f"- Command: `{command_line()}` (the runs took {elapsed / 60:.0f} min of wall time"
        + (f"; {continued} of {len(summaries)} went on from an earlier call, resumed or given a longer budget, "
           "and count from their start)" if continued else ")"),
        f"- Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when this report was written "
        "(other work shared the machine; the interleaved order spreads its load over every arm)",
        f"- Setup (`experiment={args.experiment}` {' '.join(args.overrides)}): model {described(cfg.model)} "
        f"({depth} exit points); data {described(d)}; batch {t.batch_size} ({t.batch_mode}); "
        f"{t.max_time_s:g} s of training per run, evaluation every {t.eval_every_s:g} s of training time; "
        f"scheduler {t.scheduler}, warm-up {t.warmup:g} ({t.schedule_unit})",
        "- Arms: " + "; ".join(f"{arm}: `{' '.join(o.format(depth=depth) for o in ARMS[arm])}`" for arm in arms),
        f"- Seeds {', '.join(map(str, seeds))}; cells are median [min, max] over seeds; a count (n/{len(seeds)}) "
        "says how many runs reached the target when not all did",
        f"- Run folders: `{runs_dir}` (each has metrics.jsonl, summary.json and its sift-train log beside it)",
    ]
    if sweep_rows:
        text += ["", f"## Learning-rate sweep (seed {args.sweep_seed}, {sweep_budget:g} s each, best val_acc "
                 "within that budget; bold: the rate used below)", "",
                 markdown_table(["arm"] + [f"lr {x:g}" for x in lrs], sweep_rows)]
    text += ["", "## Comparison", ""] + comparison(runner, arms, lr, seeds, list(cfg.targets))
    text += sift_compare(runs_dir / "main", list(cfg.targets), args.plots or out.parent / f"{out.stem}-plots", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text[-40:]))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
