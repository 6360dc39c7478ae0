"""The training loop: score -> select -> update, with the clock, evaluation and records around it."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from typing import Optional

import torch
from hydra.utils import instantiate
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from transformers import get_scheduler

from sift_cli.config import ConfigError, step_sizes
from sift_cli.records import DIAGNOSTICS, Recorder
from sift_cli.selection import overlap, random_subset, spearman, top


class Clock:
    """Wall-clock of training only: running between start() and stop(), paused for evaluation."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.since = device, 0.0, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> float:
        if self.since is None:  # already stopped (Ctrl-C during an evaluation)
            return self.total
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued kernels belong to the time just measured
        self.total += time.perf_counter() - self.since
        self.since = None
        return self.total

    def peek(self) -> float:
        # no synchronisation: off by at most the work still queued on the GPU, fine for a budget check
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off and batch-norm statistics frozen, for scoring and evaluation."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def take(batch: dict, index: torch.Tensor) -> dict:
    return {k: v[index] for k, v in batch.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    # from pinned memory the copy is asynchronous: the host queues the step instead of waiting for the GPU
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts: bf16 on CUDA where supported (precision=auto), fp32 otherwise."""
    bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(model, batches: list[dict], autocast) -> dict:
    with eval_mode(model), autocast():
        sums = [model.evaluate(b) for b in batches]
    total = {k: sum(s[k] for s in sums).item() for k in sums[0]}
    row = {"val_acc": total["correct"] / total["count"], "val_loss": total["loss_sum"] / total["count"]}
    # extra accuracies a model reports, e.g. an exit head's "exit_correct" -> "val_exit_acc"
    row.update({f"val_{k[:-len('_correct')]}_acc": v / total["count"] for k, v in total.items()
                if k.endswith("_correct")})
    return row


def progress_bar(enabled: bool) -> Progress:
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("{task.fields[rate]:,.0f} samples/s"), TextColumn("val_acc {task.fields[val_acc]}"),
               TimeElapsedColumn()]
    return Progress(*columns, disable=not enabled, transient=False)


def train_step(model, batch: dict, optimizer, scheduler, autocast, *, frac: float, criterion: str,
               exit_layer: int, kept: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
    """One step: score -> select -> update. Returns the loss and, when scored, (sum of scores, sum kept)."""
    score_sums = None
    if frac < 1:  # vanilla never scores
        if criterion == "random":
            keep = random_subset(len(batch["labels"]), kept, generator)
        else:
            with torch.no_grad(), eval_mode(model), autocast():
                scores = model.exit_scores(batch, exit_layer, criterion)
            keep = top(scores, kept)
            score_sums = torch.stack([scores.sum(), scores[keep].sum()])
        batch = take(batch, keep)
    with autocast():
        loss = model.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss.detach(), score_sums


@torch.no_grad()
def diagnose(model, probe: dict, frac: float, criterion: str, autocast) -> dict:
    """How well each exit layer's score ranks the probe batch against the exact per-sample loss."""
    criterion = criterion if criterion in ("loss", "entropy") else "loss"
    keep = step_sizes(len(probe["labels"]), frac, "scored")[1]
    with eval_mode(model), autocast():
        exact = model.exit_scores(probe, model.depth, "loss")
        scores = {k: model.exit_scores(probe, k, criterion) for k in range(1, model.depth + 1)}
    row = {}
    for k, s in scores.items():
        row[f"spearman_k{k}"] = spearman(s, exact)
        row[f"overlap_k{k}"] = overlap(top(s, keep), top(exact, keep))
    return row


def fit(model, data, cfg, record: Recorder, device: torch.device, show_progress: bool) -> dict:
    """Train until the step or time budget runs out. Returns the totals for summary.json."""
    t = cfg.trainer
    scored, kept = step_sizes(t.batch_size, cfg.frac, t.batch_mode)
    if data.num_train < scored:
        raise ConfigError(f"trainer.batch_size draws {scored} samples per step but the training set has "
                          f"{data.num_train}; use a smaller batch or more data")
    optimizer = instantiate(t.optimizer)(params=model.parameters())
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.max_steps)
    autocast = autocast_for(t.precision, device)
    step_args = dict(frac=cfg.frac, criterion=cfg.criterion, exit_layer=cfg.exit_layer, kept=kept,
                     generator=torch.Generator(device).manual_seed(cfg.seed))  # the random arm's own stream
    val = [to_device(b, device) for b in data.val_batches(t.eval_batch_size)]
    diagnose_every = cfg.diagnostics.every_n_steps
    max_steps, max_time = t.max_steps or math.inf, t.max_time_s or math.inf
    next_eval_s = t.eval_every_s or math.inf
    clock, wall_start = Clock(device), time.perf_counter()
    step = seen = backpropagated = 0
    window = []  # (loss, score sums) of the steps since the last evaluation, still on the device

    def log_eval() -> dict:
        losses = [loss for loss, _ in window]
        row = {"step": step, "train_time_s": clock.total, "wall_time_s": time.perf_counter() - wall_start,
               "samples_seen": seen, "samples_backpropagated": backpropagated,
               **evaluate(model, val, autocast),
               "train_loss": torch.stack(losses).mean().item() if losses else None,
               "lr": scheduler.get_last_lr()[0]}
        sums = [s for _, s in window if s is not None]
        if sums and scored > kept:  # mean score of the kept and of the dropped samples
            total, kept_sum = torch.stack(sums).sum(0).tolist()
            row["score_kept"] = kept_sum / (len(sums) * kept)
            row["score_dropped"] = (total - kept_sum) / (len(sums) * (scored - kept))
        window.clear()
        record.log(row)
        return row

    last = log_eval()  # the starting point of every curve: step 0, time 0
    interrupted = False
    bar_total = max_time if t.max_time_s else max_steps
    with progress_bar(show_progress) as bar:
        task = bar.add_task("train", total=bar_total, step=0, rate=0.0, val_acc=f"{last['val_acc']:.4f}")
        model.train()
        clock.start()
        try:
            for batch in data.train_batches(scored, cfg.seed):
                window.append(train_step(model, to_device(batch, device), optimizer, scheduler, autocast,
                                         **step_args))
                step, seen, backpropagated = step + 1, seen + scored, backpropagated + kept
                elapsed = clock.peek()
                bar.update(task, completed=elapsed if t.max_time_s else step, step=step,
                           rate=seen / max(elapsed, 1e-9))
                if step >= max_steps or elapsed >= max_time:
                    break
                if diagnose_every and step % diagnose_every == 0:
                    clock.stop()  # diagnostics, like evaluation, are not training time
                    record.log({"step": step, "train_time_s": clock.total,
                                **diagnose(model, val[0], cfg.frac, cfg.criterion, autocast)}, DIAGNOSTICS)
                    clock.start()
                if (t.eval_every_steps and step % t.eval_every_steps == 0) or elapsed >= next_eval_s:
                    clock.stop()
                    last = log_eval()
                    bar.update(task, val_acc=f"{last['val_acc']:.4f}")
                    next_eval_s = clock.total + (t.eval_every_s or math.inf)
                    clock.start()
        except KeyboardInterrupt:  # keep what was trained: the final evaluation and summary still run
            interrupted = True
            print("interrupted: evaluating and writing the record", file=sys.stderr)
        clock.stop()
        if last["step"] != step:
            last = log_eval()
        bar.update(task, val_acc=f"{last['val_acc']:.4f}")

    return {
        "status": "interrupted" if interrupted else "completed",
        "steps": step,
        "train_time_s": clock.total,
        "wall_time_s": time.perf_counter() - wall_start,
        "samples_seen": seen,
        "samples_backpropagated": backpropagated,
        "samples_scored_per_step": scored,
        "samples_backpropagated_per_step": kept,
        "final_val_acc": last["val_acc"],
        "final_val_loss": last["val_loss"],
        "best_val_acc": max(r["val_acc"] for r in record.rows),
    }
