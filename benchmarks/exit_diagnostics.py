"""How early can a decoder exit and still rank its batch? Each exit's ranking against the exact loss, over training.

Two runs of the real CLI (`python -m sift_cli.train`, as time_to_accuracy.py runs it), each with
`diagnostics.every_n_steps`: on a fixed probe batch (the first validation batch), the Spearman correlation of
each exit's per-sequence score with the exact loss (exit = depth) and the overlap of their top-frac sets
(chance: frac), written to the run's diagnostics.jsonl.

1. From scratch: `experiment=gpt2_docstrings` (SIFT k=1 f=0.5; GPT-2's architecture at gpt2_tiny's width, on the
   docstrings of torch and transformers as windows of 64 tokens), with `model.num_layers=4` so that three exits
   sit below the top (gpt2_tiny's 2 blocks have one).
2. Continued training: the first run's final weights and tokenizer as a save_pretrained folder, loaded by
   `model=causal_lm model.pretrained=FOLDER`, trained on the standard library's docstrings, text the first run
   did not see (`data.packages=[]`, or --continued-set), with the same trainer settings.

    python benchmarks/exit_diagnostics.py                  # 2 x 150 s of training (results/exit_diagnostics-*.md)
    python benchmarks/exit_diagnostics.py --budget 20 --out /tmp/d.md   # a quick check of the script
    python benchmarks/exit_diagnostics.py --runs-dir DIR   # finished runs in DIR are kept, not trained again
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

from hydra.utils import instantiate

from common import RESULTS, app_config, command_line, machine, markdown_table
from time_to_accuracy import REPO, sift_compare
from sift_cli.checkpoint import Checkpointer, load_tensors
from sift_cli.compare import group_runs, load_run, plot_diagnostics
from sift_cli.records import COMPLETED, DIAGNOSTICS, SUMMARY, read_metrics, run_status

SPEARMAN_ENOUGH = 0.9  # "ranks its batch": the exit's order agrees with the exact loss's at least this well


def train(folder: Path, overrides: list[str]) -> Path:
    """One sift-train run in `folder` (its log beside it), unless a finished one is there already."""
    if run_status(folder) != COMPLETED:
        folder.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "sift_cli.train", *overrides, f"hydra.run.dir={folder}"]
        print(f"{folder.name}: {' '.join(overrides)}", flush=True)
        with open(folder.with_suffix(".log"), "w") as log:
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or run_status(folder) != COMPLETED:
            sys.exit(f"exit_diagnostics: {folder.name} failed (exit {done.returncode}); "
                     f"see {folder.with_suffix('.log')}")
    return folder


def export(run: Path, overrides: list[str]) -> Path:
    """The run's final weights and its tokenizer as one save_pretrained folder, <run>/hf, which
    `model=causal_lm model.pretrained=<run>/hf` loads."""
    folder = run / "hf"
    if not (folder / "config.json").exists():
        cfg = app_config(overrides)
        data = instantiate(cfg.data)  # the run's token cache: built already, so this only reads it
        model = instantiate(cfg.model, **data.model_args)
        checkpoint, _ = Checkpointer(run, keep=1).newest()
        model.load_state_dict(load_tensors(checkpoint)["model"])
        model.save_pretrained(folder)
        data.tokenizer.save_pretrained(folder)
    return folder


def exits(rows: list[dict]) -> list[int]:
    return sorted({int(key.rsplit("_k", 1)[1]) for row in rows for key in row if key.startswith("spearman_k")})


def over_training(name: str, rows: list[dict], points: int) -> list[str]:
    """Spearman and overlap of every exit at `points` steps spread over the run, first and last included."""
    picked = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
    ks = exits(rows)
    table = [[rows[i]["step"], f"{rows[i]['train_time_s']:.0f}"]
             + [f"{rows[i][f'spearman_k{k}']:.3f}" for k in ks] + [f"{rows[i][f'overlap_k{k}']:.2f}" for k in ks]
             for i in picked]
    return [f"### {name}", "", markdown_table(["step", "training s"] + [f"Spearman k={k}" for k in ks]
                                              + [f"overlap k={k}" for k in ks], table)]


def late_medians(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """Per exit, the median Spearman and overlap over the second half of the run's probes."""
    late = rows[len(rows) // 2:]
    return {k: tuple(statistics.median(r[f"{key}_k{k}"] for r in late) for key in ("spearman", "overlap"))
            for k in exits(rows)}


def answer(name: str, rows: list[dict], frac: float) -> str:
    medians = late_medians(rows)
    depth = max(medians)
    enough = [k for k in medians if medians[k][0] >= SPEARMAN_ENOUGH]
    cells = "; ".join(f"exit {k}: Spearman {s:.2f}, overlap {o:.2f}" for k, (s, o) in medians.items() if k < depth)
    verdict = (f"exit {enough[0]} of {depth} is the earliest at or above Spearman {SPEARMAN_ENOUGH}"
               if enough[0] < depth else f"no exit below the top reaches Spearman {SPEARMAN_ENOUGH}")
    return (f"- **{name}** (median over the second half of its probes; overlap by chance {frac:g}): {cells}. "
            f"{verdict[0].upper() + verdict[1:]}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=150, help="training seconds per run (trainer.max_time_s)")
    parser.add_argument("--every", type=int, default=20, help="steps between probes (diagnostics.every_n_steps)")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks (model.num_layers)")
    parser.add_argument("--points", type=int, default=5, help="rows per table: probes spread over each run")
    parser.add_argument("--runs-dir", type=Path, help="run folders (default outputs/bench-exits/TIME)")
    parser.add_argument("--out", type=Path, default=RESULTS / "exit_diagnostics-gpt2_tiny.md")
    parser.add_argument("--continued-set", action="append", metavar="KEY=VALUE",
                        help="the continued run's data, after the overrides (default: data.packages=[], the standard "
                             "library's docstrings; repeatable)")
    parser.add_argument("overrides", nargs="*", help="extra sift-train overrides for both runs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared CPU (benchmarks/README.md), inherited by the runs
    # absolute: the runs' own processes start in the repository, and read the exported folder from there
    runs_dir = (args.runs_dir or REPO / "outputs" / "bench-exits" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    shared = ["experiment=gpt2_docstrings", "logger=none", f"trainer.max_time_s={args.budget:g}",
              f"diagnostics.every_n_steps={args.every}", *args.overrides]
    scratch_overrides = [*shared, f"model.num_layers={args.layers}"]

    started = time.perf_counter()
    scratch = train(runs_dir / "scratch", scratch_overrides)
    pretrained = export(scratch, scratch_overrides)
    continued_overrides = [*shared, "model=causal_lm", f"model.pretrained={pretrained}",
                           *(args.continued_set or ["data.packages=[]"])]
    continued = train(runs_dir / "continued", continued_overrides)
    elapsed = time.perf_counter() - started

    cfg = app_config(scratch_overrides)
    plots = args.out.parent / f"{args.out.stem}-plots"
    runs = {"From scratch": (scratch, scratch_overrides), "Continued training": (continued, continued_overrides)}
    diagnostics = {name: read_metrics(folder, DIAGNOSTICS) for name, (folder, _) in runs.items()}
    summaries = {name: json.loads((folder / SUMMARY).read_text()) for name, (folder, _) in runs.items()}
    text = [
        "# How early can a decoder exit and still rank its batch?", "",
        f"- Command: `{command_line()}` ({elapsed / 60:.0f} min; a run found finished in its folder is kept, not "
        "trained again)",
        f"- Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when this report was written",
        *(f"- {name}: `sift-train {' '.join(overrides)}` ({summaries[name]['steps']} steps in "
          f"{summaries[name]['train_time_s']:.0f} s of training, {summaries[name]['wall_time_s'] / 60:.1f} min of wall "
          f"time, final val_acc {summaries[name]['final_val_acc']:.3f}; folder `{folder}`)"
          for name, (folder, overrides) in runs.items()),
        f"- Probe: the first validation batch ({cfg.trainer.eval_batch_size} windows of {cfg.data.seq_len} tokens), "
        f"every {args.every} steps; each exit's score is its mean next-token loss (the logit lens: block k, then "
        f"the model's final norm and LM head); Spearman against the exact loss (exit {args.layers}); overlap: the "
        f"share of the exact loss's top {cfg.frac:g} that the exit's top {cfg.frac:g} holds (chance: {cfg.frac:g})",
        "", "## The answer", "",
        *(answer(name, rows, cfg.frac) for name, rows in diagnostics.items()),
        f"- What this does not show: one seed and one probe batch, on a {args.layers}-block model trained for "
        "minutes; a deeper or longer-trained model may separate its exits more (`--layers`, `--budget`).",
        "", "## Over training", "",
    ]
    for name, rows in diagnostics.items():
        text += over_training(name, rows, args.points) + [""]
    text += [f"![Spearman and overlap of each exit against training time]"
             f"({os.path.relpath(plots / 'diagnostics.png', args.out.parent)})"]
    # sift-compare reads both folders: its table (accuracy, loss) and its plots
    text += sift_compare(runs_dir, list(cfg.targets), plots, args.out)
    # its diagnostics plot again, each run named as above rather than by its whole setting
    groups = [group_runs([load_run(folder)])[0] for folder, _ in runs.values()]
    for group, name in zip(groups, runs):
        group.arm, group.label = name, ""
    plot_diagnostics(groups, plots / "diagnostics.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text[:40]))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
