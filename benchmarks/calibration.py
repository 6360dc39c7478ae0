"""Calibration on known answers: can the tool see a selection effect where one must exist?

Two training sets with a known answer (`data.duplicate_fraction`, `data.noise_fraction`; validation
is untouched), BERT-Tiny on docstrings and ResNet-18 on digits, seven arms, several seeds:

- duplicates (d=0.5: half the training samples are copies of 4 others): the copies become easy after
  a few passes, so selecting by loss must reach an accuracy with fewer samples back-propagated than
  random selection, and the gap must be larger than without duplicates (d=0);
- noise (0.3: random tokens, wrong labels): high loss forever, so selecting by loss must do worse
  than random (RHO-LOSS's argument).

Every run is `sift_cli.train.run` in this process, in its own folder under --runs-dir (resumable:
completed runs are kept). Budgets are equal in samples back-propagated (vanilla takes half the steps
of the frac 0.5 arms), and every arm is evaluated at the same sample counts. Runs are interleaved
(the arm order rotates), so a change in the machine's load touches every arm alike.

    python benchmarks/calibration.py                  # the report: benchmarks/results/calibration.md
    python benchmarks/calibration.py --quick          # one seed, a quarter of the budget: checks the script
    python benchmarks/calibration.py --runs-dir DIR   # resume
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from hydra.utils import get_class  # noqa: E402

from common import app_config, command_line, machine, markdown_table, report_path  # noqa: E402
from sift_cli.checkpoint import FOLDER as CHECKPOINTS  # noqa: E402
from sift_cli.records import COMPLETED, SUMMARY, read_metrics, run_status  # noqa: E402
from sift_cli.train import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the overrides that make each arm; {depth} is the model's number of exit points (exact loss)
ARMS = {
    "vanilla": ["frac=1.0"],
    "random": ["frac=0.5", "criterion=random"],
    "exact": ["frac=0.5", "criterion=loss", "exit_layer={depth}"],
    "sift": ["frac=0.5", "criterion=loss", "exit_layer=1"],
    "loss_proportional": ["frac=0.5", "criterion=loss_proportional", "exit_layer=1"],
    "gradnorm": ["frac=0.5", "criterion=gradnorm", "exit_layer=1"],
    "diverse": ["frac=0.5", "criterion=diverse", "exit_layer=1"],
}
LOSS_ARMS = ("exact", "sift")  # the arms the known answers speak about
LOWER_IS_BETTER = {"val_loss": -1}  # the sign that makes "ahead of random" positive, per metric
SETTINGS = {
    "d=0": [],
    "d=0.5": ["data.duplicate_fraction=0.5"],
    "noise=0.3": ["data.noise_fraction=0.3"],
}
# a step budget, evaluated on steps: the same schedule and evaluation points on any machine load
COMMON = ["logger=none", "trainer.progress=false", "trainer.checkpoint_every_s=null", "trainer.max_time_s=null",
          "trainer.eval_every_s=null", "trainer.schedule_unit=steps", "trainer.warmup=10"]


@dataclass(frozen=True)
class Model:
    """A model and data choice with its budget in samples back-propagated, and evaluated every `eval_every`."""

    key: str                 # conf/model choice
    label: str
    data: str                # conf/data choice
    overrides: tuple
    batch_size: int
    samples: int
    eval_every: int
    lr: float


MODELS = {
    "bert_tiny": Model("bert_tiny", "BERT-Tiny, docstrings", "docstrings",
                       ("data.packages=[torch,transformers]", "data.vocab_size=1024", "data.seq_len=64",
                        "trainer.eval_batch_size=128"),
                       batch_size=32, samples=5120, eval_every=512, lr=2e-3),
    "resnet18": Model("resnet18", "ResNet-18, digits", "digits",
                      ("data.image_size=16", "trainer.eval_batch_size=128"),
                      batch_size=32, samples=1536, eval_every=192, lr=1e-3),
}


def frac_of(arm: str) -> float:
    return float(next(o for o in ARMS[arm] if o.startswith("frac=")).split("=", 1)[1])


@functools.lru_cache
def depth_of(model: Model) -> int:
    cfg = app_config([f"model={model.key}", f"data={model.data}"])
    return getattr(get_class(cfg.model._target_), "depth", None) or cfg.model.num_layers


def overrides(model: Model, depth: int, setting: str, arm: str, seed: int) -> list[str]:
    """The sift-train overrides of one run: the arm, the setting, and steps that make the sample budget."""
    kept = math.ceil(frac_of(arm) * model.batch_size)
    if model.samples % kept or model.eval_every % kept:
        raise ValueError(f"{model.key}: samples {model.samples} and eval_every {model.eval_every} must be multiples "
                         f"of the {kept} samples {arm} back-propagates a step")
    return [*model_overrides(model), *SETTINGS[setting], *(o.format(depth=depth) for o in ARMS[arm]), f"seed={seed}",
            f"trainer.max_steps={model.samples // kept}", f"trainer.eval_every_steps={model.eval_every // kept}",
            *COMMON]


def model_overrides(model: Model) -> list[str]:
    return [f"model={model.key}", f"data={model.data}", *model.overrides, f"trainer.batch_size={model.batch_size}",
            f"trainer.optimizer.lr={model.lr:g}"]


def completed(folder: Path) -> bool:
    return run_status(folder) == COMPLETED


@dataclass
class Plan:
    models: list
    settings: list
    arms: list
    seeds: list
    runs_dir: Path
    extra: list = field(default_factory=list)  # overrides for every run
    quick: bool = False  # --quick: one seed, a quarter of the budget: the plumbing checked, nothing measured

    def folder(self, model: Model, setting: str, arm: str, seed: int) -> Path:
        return self.runs_dir / model.key / setting / f"{arm}-s{seed}"

    def jobs(self) -> list[tuple]:
        """(model, setting, arm, seed) in run order: seeds outermost, the arm order rotated every round."""
        order, rounds = [], 0
        for seed in self.seeds:
            for model in self.models:
                for setting in self.settings:
                    by = rounds % len(self.arms)
                    order += [(model, setting, arm, seed) for arm in self.arms[by:] + self.arms[:by]]
                    rounds += 1
        return order

    def run_all(self) -> None:
        depths = {m.key: depth_of(m) for m in self.models}
        jobs = self.jobs()
        for number, (model, setting, arm, seed) in enumerate(jobs, 1):
            folder = self.folder(model, setting, arm, seed)
            if completed(folder):
                continue
            cfg = app_config(overrides(model, depths[model.key], setting, arm, seed) + self.extra)
            started = time.perf_counter()
            summary = run(cfg, folder, {"model": model.key, "data": model.data})
            # the report reads metrics and summary only; 63 ResNet-18 checkpoints would take 8 GB
            shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
            print(f"[{number}/{len(jobs)}] {model.key} {setting} {arm} seed {seed}: val_acc "
                  f"{summary['final_val_acc']:.4f}, {summary['train_time_s']:.1f} s training, "
                  f"{time.perf_counter() - started:.0f} s wall", flush=True)


# --- reading the runs -----------------------------------------------------------------------


def curve(rows: list[dict], key: str, at: float, metric: str = "val_acc") -> Optional[float]:
    """`metric` at `at` of `key` (samples_backpropagated or train_time_s), linear between evaluations."""
    xs = [r[key] for r in rows]
    if at > xs[-1]:
        return None
    return float(np.interp(at, xs, [r[metric] for r in rows]))


def pooled_std(columns: list[list[float]]) -> Optional[float]:
    """The seed spread: the standard deviation over seeds, pooled over arms (each arm's variance alike)."""
    variances = [statistics.variance(c) for c in columns if len(c) > 1]
    return math.sqrt(statistics.mean(variances)) if variances else None


def gap(arm: list[float], random: list[float], sigma: Optional[float], sign: int = 1) -> dict:
    """How far `arm` is ahead of random (sign=-1: behind), paired by seed, in units of the seed spread."""
    diffs = [sign * (a - r) for a, r in zip(arm, random)]
    mean = statistics.mean(diffs)
    return {"mean": mean, "sigmas": mean / sigma if sigma else None,
            "wins": sum(d > 0 for d in diffs), "seeds": len(diffs)}


def observed(g: dict) -> bool:
    """The rule for a verdict: the expected sign on every seed, and a mean gap of at least one seed spread."""
    return g["wins"] == g["seeds"] and g["sigmas"] is not None and g["sigmas"] >= 1


def verdict(g: dict, plan: Plan) -> str:
    if plan.quick:  # one seed and a short budget: no spread to weigh a gap against
        return "undetermined: quick mode checks the plumbing only"
    return "observed" if observed(g) else "not observed"


def sigmas(g: dict) -> str:
    return "n/a (one seed)" if g["sigmas"] is None else f"{g['sigmas']:+.1f} std"


@dataclass
class Table:
    """One (model, setting): each arm's runs, read at fixed samples back-propagated and fixed seconds."""

    samples: list      # the N columns
    seconds: list      # the T columns (within the shortest run's training time)
    rows: dict         # arm -> [metrics rows per seed]
    ms_per_step: dict  # arm -> [per seed]

    def at(self, arm: str, per: str, x: float, metric: str = "val_acc") -> list[float]:
        """`metric` of each seed's run at `x` samples back-propagated (per="samples") or training seconds."""
        key = "samples_backpropagated" if per == "samples" else "train_time_s"
        return [curve(r, key, x, metric) for r in self.rows[arm]]

    def sigma(self, per: str, x: float, metric: str = "val_acc") -> Optional[float]:
        return pooled_std([self.at(arm, per, x, metric) for arm in self.rows])


def read_table(plan: Plan, model: Model, setting: str) -> Table:
    rows, ms = {}, {}
    for arm in plan.arms:
        rows[arm], ms[arm] = [], []
        for seed in plan.seeds:
            folder = plan.folder(model, setting, arm, seed)
            summary = json.loads((folder / SUMMARY).read_text())
            rows[arm].append(read_metrics(folder))
            ms[arm].append(1e3 * summary["train_time_s"] / summary["steps"])
    samples = [model.samples // 4, model.samples // 2, model.samples]
    window = min(r[-1]["train_time_s"] for runs in rows.values() for r in runs)
    seconds = [round(window / 2, 1), math.floor(window * 10) / 10]
    return Table(samples, seconds, rows, ms)


def cell(table: Table, arm: str, per: str, x: float, metric: str = "val_acc") -> str:
    """mean ± std over seeds, then the distance from random in seed spreads and the seeds ahead of it."""
    values = table.at(arm, per, x, metric)
    text = f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")
    sigma = table.sigma(per, x, metric)
    if arm == "random" or sigma is None:
        return text
    g = gap(values, table.at("random", per, x, metric), sigma, sign=LOWER_IS_BETTER.get(metric, 1))
    return f"{text} ({g['sigmas']:+.1f}σ, {g['wins']}/{g['seeds']})"


def listed(spreads: dict) -> str:
    return ", ".join(f"{s:.4f}" if s else "n/a" for s in spreads.values())


def tables_text(table: Table, arms: list[str]) -> list[str]:
    last = table.samples[-1]
    per_sample = [[arm, f"{statistics.mean(table.ms_per_step[arm]):.0f}"]
                  + [cell(table, arm, "samples", n) for n in table.samples]
                  + [cell(table, arm, "samples", last, "val_loss")] for arm in arms]
    per_second = [[arm] + [cell(table, arm, "seconds", t) for t in table.seconds] for arm in arms]
    spreads = {n: table.sigma("samples", n) for n in table.samples}
    spreads[f"val_loss {last}"] = table.sigma("samples", last, "val_loss")
    return [markdown_table(["arm", "ms per step"] + [f"N = {n:,} samples" for n in table.samples]
                           + [f"val_loss at N = {last:,}"], per_sample), "",
            f"Seed spread (std over seeds pooled over arms) in these columns: {listed(spreads)}", "",
            markdown_table(["arm"] + [f"T = {t:g} s" for t in table.seconds], per_second), "",
            f"Seed spread in these columns: {listed({t: table.sigma('seconds', t) for t in table.seconds})}"]


def versus(table: Table, arm: str, per: str, metric: str, sign: int) -> dict:
    """gap() of `arm` against random at the end of the budget (per sample) or of the shortest run (per second)."""
    x = table.samples[-1] if per == "samples" else table.seconds[-1]
    return gap(table.at(arm, per, x, metric), table.at("random", per, x, metric), table.sigma(per, x, metric),
               sign=sign * LOWER_IS_BETTER.get(metric, 1))


def growth(before: Table, after: Table, arm: str, metric: str) -> dict:
    """gap() of the arm's per-seed lead over random (positive: better) in `after` against that in `before`."""
    leads, spreads = [], []
    for table in (after, before):
        x, sign = table.samples[-1], LOWER_IS_BETTER.get(metric, 1)
        ours, theirs = table.at(arm, "samples", x, metric), table.at("random", "samples", x, metric)
        leads.append([sign * (a - r) for a, r in zip(ours, theirs)])
        spreads.append(table.sigma("samples", x, metric))
    return gap(*leads, math.sqrt(statistics.mean(s ** 2 for s in spreads)) if all(spreads) else None)


def verdicts(tables: dict, model: Model, plan: Plan) -> list[str]:
    """A plain verdict per known answer and loss arm: val_acc per sample; val_loss and per second alongside."""
    lines = []
    for arm in LOSS_ARMS:
        if arm not in plan.arms:
            continue
        name = f"{arm} (`{' '.join(ARMS[arm]).format(depth='L')}`)"
        for setting, sign, claim in (("d=0.5", 1, "ahead of"), ("noise=0.3", -1, "behind")):
            if setting not in tables:
                continue
            t = tables[setting]
            acc, loss = versus(t, arm, "samples", "val_acc", sign), versus(t, arm, "samples", "val_loss", sign)
            sec = versus(t, arm, "seconds", "val_acc", sign)
            lines.append(f"- {setting}, {model.label}: {name} {claim} random per sample (val_acc at N = "
                         f"{t.samples[-1]:,}): **{verdict(acc, plan)}** (by "
                         f"{sigmas(acc)}, {acc['wins']}/{acc['seeds']} seeds; val_loss: {sigmas(loss)}, "
                         f"{loss['wins']}/{loss['seeds']}; per second, val_acc at T = {t.seconds[-1]:g} s: "
                         f"{sigmas(sec)}, {sec['wins']}/{sec['seeds']})")
        if "d=0" in tables and "d=0.5" in tables:
            acc, loss = (growth(tables["d=0"], tables["d=0.5"], arm, metric) for metric in ("val_acc", "val_loss"))
            lines.append(f"- gap grows with d, {model.label}: {name}'s lead over random per sample, at d=0.5 less at "
                         f"d=0: **{verdict(acc, plan)}** ({acc['mean']:+.4f} val_acc, "
                         f"{sigmas(acc)}, larger on {acc['wins']}/{acc['seeds']} seeds; val_loss: {sigmas(loss)}, "
                         f"{loss['wins']}/{loss['seeds']})")
    return lines


def plot(tables: dict, model: Model, arms: list[str], path: Path) -> None:
    """val_acc against samples back-propagated and training seconds, val_loss against samples: mean over seeds,
    ± std shaded; one row per setting."""
    panels = (("samples_backpropagated", "samples back-propagated", "val_acc"),
              ("train_time_s", "training seconds", "val_acc"),
              ("samples_backpropagated", "samples back-propagated", "val_loss"))
    fig, axes = plt.subplots(len(tables), len(panels), figsize=(15, 3.6 * len(tables)), squeeze=False)
    for (setting, table), row in zip(tables.items(), axes):
        for ax, (key, label, metric) in zip(row, panels):
            xs = np.linspace(0, model.samples if key == "samples_backpropagated" else table.seconds[-1], 50)
            for arm in arms:
                ys = np.array([[curve(r, key, x, metric) for x in xs] for r in table.rows[arm]], dtype=float)
                mean, std = ys.mean(0), ys.std(0)
                style = "--" if arm in ("vanilla", "random") else "-"
                ax.plot(xs, mean, style, label=arm, lw=2 if arm in LOSS_ARMS else 1.2)
                ax.fill_between(xs, mean - std, mean + std, alpha=0.12)
            ax.set(title=f"{model.label}, {setting}", xlabel=label, ylabel=metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(plan: Plan, out: Path, started: float) -> str:
    text, summary_lines = [], []
    for model in plan.models:
        tables = {s: read_table(plan, model, s) for s in plan.settings}
        picture = out.parent / f"{out.stem}-{model.key}.png"
        plot(tables, model, plan.arms, picture)
        summary_lines += verdicts(tables, model, plan)
        text += ["", f"## {model.label}", "", f"![{model.label}]({picture.name})"]
        for setting, table in tables.items():
            text += ["", f"### {model.label}, {setting}", "", *tables_text(table, plan.arms)]
    folders = [plan.folder(m, s, a, seed) for m, s, a, seed in plan.jobs()]
    span = max((f / SUMMARY).stat().st_mtime for f in folders) - min((f / "run.json").stat().st_ctime for f in folders)
    depth_note = ", ".join(f"{m.label}: L = {depth_of(m)}" for m in plan.models)
    head = [
        "# Calibration on known answers: does the tool see a selection effect where one must exist?", "",
        f"- Command: `{command_line()}`; the runs took {span / 60:.0f} min of wall time from the first start to "
        f"the last finish (this call {(time.perf_counter() - started) / 60:.0f} min: runs completed earlier in the "
        "folder are read back, not trained again)",
        f"- Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when this report was written. The CPU "
        "was shared with other work: per-second figures carry its load, per-sample figures do not (a run's "
        "samples, batches and evaluation points are fixed by its seed and step budget), so the verdicts are "
        "per sample, with per second alongside",
        *(f"- {m.label}: `{' '.join(model_overrides(m))} {' '.join(COMMON)}`; {m.samples:,} samples "
          f"back-propagated per run ({m.samples // m.batch_size} steps for vanilla, "
          f"{m.samples // math.ceil(m.batch_size / 2)} for the frac 0.5 arms), evaluated every {m.eval_every:,} samples"
          for m in plan.models),
        "- Settings: " + "; ".join(f"{s}: `{' '.join(SETTINGS[s]) or 'as is'}`" for s in plan.settings)
        + " (duplicates: copies of a pool of 4 training samples; noise: random tokens for text, a wrong label for "
          "images; the same samples for every seed, chosen by data.split_seed; validation is never changed)",
        "- Arms: " + "; ".join(f"{a}: `{' '.join(ARMS[a]).format(depth='L')}`" for a in plan.arms)
        + f" ({depth_note}: the exact loss of the full model)",
        f"- Seeds {', '.join(map(str, plan.seeds))}: cells are mean ± std over seeds of val_acc at N samples "
        "back-propagated and at T training seconds (linear between evaluations; T within the shortest run of "
        "that setting, usually a vanilla one: it takes half the steps, so per second covers about the first half "
        "of the frac 0.5 runs), then (distance from random in units of the seed spread, seeds on which the arm "
        "is ahead of random with the same seed). The seed spread is the std over seeds pooled over the arms. val_loss "
        "(lower is better; σ and seeds count being lower than random as ahead) is read alongside: it is smoother "
        "than val_acc while a model is still near its first plateau",
        f"- Run folders: `{plan.runs_dir}`",
        "", "## Verdicts", "",
        "Rule: **observed** when the arm is on the expected side of random on every seed and the mean gap is at "
        "least one seed spread (val_acc, per sample); otherwise not observed, by the distance shown. In these "
        "lines a distance is signed so that positive is the expected side (ahead of random for duplicates, "
        "behind it for noise) and n/3 counts the seeds on that side; in the tables below positive is ahead."
        + (" With --quick (one seed, a quarter of the budget) every verdict is undetermined: the run checks the "
           "plumbing only." if plan.quick else ""), "",
        *summary_lines,
    ]
    return "\n".join(head + text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of: {', '.join(SETTINGS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of: {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs-dir", type=Path, help="run folders (default outputs/bench-calibration/TIME); an "
                                                      "existing one resumes")
    parser.add_argument("--out", type=Path, help="report (default benchmarks/results/calibration.md; with --quick "
                                                 "outputs/benchmarks/calibration-quick.md); "
                                                 "its plots go beside it")
    parser.add_argument("--quick", action="store_true", help="one seed, a quarter of the budget, half as many "
                                                               "evaluations: checks the script, sizes the full run")
    parser.add_argument("overrides", nargs="*", help="extra sift-train overrides for every run")
    args = parser.parse_args()
    chosen = {}
    for name, table in (("models", MODELS), ("settings", SETTINGS), ("arms", ARMS)):
        chosen[name] = getattr(args, name).split(",")
        unknown = [x for x in chosen[name] if x not in table]
        if unknown:
            parser.error(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(table)}")
    if "random" not in chosen["arms"]:
        parser.error("--arms must include random: every arm is measured against it")
    models = [MODELS[m] for m in chosen["models"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        models = [replace(m, samples=m.samples // 4, eval_every=m.eval_every // 2) for m in models]
        seeds = seeds[:1]
    runs_dir = args.runs_dir or REPO / "outputs" / "bench-calibration" / time.strftime("%Y%m%d-%H%M%S")
    out = report_path("calibration", args.quick, args.out)
    plan = Plan(models, chosen["settings"], chosen["arms"], seeds, runs_dir, args.overrides, args.quick)
    print(f"runs in {runs_dir}: {len(plan.jobs())} runs", flush=True)
    started = time.perf_counter()
    plan.run_all()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report(plan, out, started)
    out.write_text(text)
    print(text)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
