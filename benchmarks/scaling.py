"""Steps per second of one run on 1 and on 2 processes, at a fixed global batch, on this CPU.

Every point is a real `sift-train` run (under torchrun for 2 processes, gloo on the CPU) and its own
records: with `trainer.eval_every_steps=W` and `trainer.max_steps=W+N`, the training clock between the
evaluations at steps W and W+N is the time of N steps after W warm-up steps. Three ways to spend the
machine are compared: 1 process with 1 thread (what one rank has), 1 process with as many threads as
ranks (the same cores as 2 processes), and 2 processes with 1 thread each (OMP_NUM_THREADS per rank).
Arms: vanilla, and SIFT (exit 1, frac 0.5) with trainer.selection_scope local and global (one
process: the two are the same run). Repetitions run interleaved, in a rotated order.

    python benchmarks/scaling.py                   # bert_mini, batch 32x128, 10 timed steps, 3 repetitions
    python benchmarks/scaling.py --quick           # bert_tiny, 5 timed steps, 1 repetition: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, markdown_table, report_path, spread
from sift_cli.records import METRICS

REPO = Path(__file__).resolve().parents[1]
ARMS = {"vanilla": ["frac=1.0"], "sift local": ["frac=0.5", "exit_layer=1", "trainer.selection_scope=local"],
        "sift global": ["frac=0.5", "exit_layer=1", "trainer.selection_scope=global"]}
LAYOUTS = {"1 x 1 thread": (1, 1), "1 x 2 threads": (1, 2), "2 x 1 thread": (2, 1)}  # processes x threads each


def steps_per_s(run_dir: Path, warmup: int, steps: int) -> float:
    clock = {r["step"]: r["train_time_s"] for r in map(json.loads, (run_dir / METRICS).read_text().splitlines())}
    return steps / (clock[warmup + steps] - clock[warmup])


def one_run(layout: str, arm: str, overrides: list[str], run_dir: Path, warmup: int, steps: int) -> float:
    procs, threads = LAYOUTS[layout]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    command = [sys.executable, *launcher, "-m", "sift_cli.train", *overrides, *ARMS[arm],
               f"trainer.eval_every_steps={warmup}", f"trainer.max_steps={warmup + steps}",
               f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        sys.exit(f"{layout}, {arm} failed:\n{done.stderr[-3000:]}")
    return steps_per_s(run_dir, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert_mini")
    parser.add_argument("--batch", type=int, default=32, help="the global batch (trainer.batch_size)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the clock is read")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="bert_tiny, 5 steps, 1 repetition")
    parser.add_argument("--out", type=Path, help="markdown report (default benchmarks/results/scaling-cpu.md; with "
                                                 "--quick outputs/benchmarks/scaling-cpu-quick.md)")
    parser.add_argument("overrides", nargs="*", help="extra sift-train overrides for every run")
    args = parser.parse_args()
    # passive OpenMP threads unless set (as `make bench`): on a shared CPU, spinning threads that wait
    # for a descheduled sibling would be measured instead of the layouts
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.quick:
        args.model, args.steps, args.reps = "bert_tiny", 5, 1
    out = report_path("scaling-cpu", args.quick, args.out)
    # no data workers: each process then does its own batch preparation on its own thread, and a
    # rank's process count is the whole story; a small validation set keeps the evaluations short
    overrides = [f"model={args.model}", "data=docstrings", "data.num_workers=0", "data.max_val_samples=64",
                 f"trainer.batch_size={args.batch}", "trainer.max_time_s=null", "trainer.eval_every_s=null",
                 "trainer.schedule_unit=steps", "trainer.warmup=2", "trainer.device=cpu", "logger=none",
                 *args.overrides]
    points = [(layout, arm) for layout in LAYOUTS for arm in ARMS if not (LAYOUTS[layout][0] == 1 and arm ==
                                                                          "sift global")]
    rates: dict[tuple[str, str], list[float]] = {p: [] for p in points}
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sift-scaling-") as tmp:
        for rep in range(args.reps):
            shift = rep % len(points)
            for i, (layout, arm) in enumerate(points[shift:] + points[:shift]):
                rate = one_run(layout, arm, overrides, Path(tmp) / f"{rep}-{i}", args.warmup, args.steps)
                rates[layout, arm].append(rate)
                print(f"rep {rep}: {layout:14s} {arm:12s} {rate:.3f} steps/s", flush=True)
    elapsed = time.perf_counter() - started

    def cell(layout: str, arm: str) -> str:
        one = "sift local" if arm == "sift global" and LAYOUTS[layout][0] == 1 else arm  # the same run there
        return spread(rates[layout, one])

    def ratio(arm: str, over: str) -> str:
        """Speed-up of 2 processes over a one-process layout, within each repetition."""
        base = "sift local" if arm == "sift global" else arm
        values = [a / b for a, b in zip(rates["2 x 1 thread", arm], rates[over, base])]
        return spread(values)

    rows = [[arm, cell("1 x 1 thread", arm), cell("1 x 2 threads", arm), cell("2 x 1 thread", arm),
             ratio(arm, "1 x 2 threads"), ratio(arm, "1 x 1 thread")] for arm in ARMS]
    text = [
        "# Scaling: steps per second on 1 and 2 processes (CPU, gloo)", "",
        f"- Command: `{command_line()}` ({elapsed / 60:.0f} min)",
        f"- Machine: {machine()}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(other work shared the machine; the rotated order spreads its load over every point)",
        f"- Setup: model={args.model}, data=docstrings (128 tokens), global batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup}, fp32, no data workers; every run through `sift-train`, "
        "2 processes through `torchrun --standalone --nproc_per_node 2`; extra overrides: "
        f"`{' '.join(args.overrides) or 'none'}`",
        f"- Cells: steps per second of the global batch, median [min, max] over {args.reps} repetitions; "
        "speed-ups are taken within a repetition",
        "",
        markdown_table(["arm", "1 process, 1 thread", "1 process, 2 threads", "2 processes, 1 thread each",
                        "2 proc / 1 proc 2 threads", "2 proc / 1 proc 1 thread"], rows),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
