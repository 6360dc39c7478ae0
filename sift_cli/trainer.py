"""The training loop: score -> select -> update, with the clock, evaluation, records and checkpoints around it."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from hydra.utils import instantiate
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sift_cli import distributed, records
from sift_cli.checkpoint import Checkpointer
from sift_cli.config import ConfigError, exit_block, first_line, step_sizes
from sift_cli.data import worker_context, worker_signals
from sift_cli.data.order import seed_of, seeded
from sift_cli.faults import kill_point
from sift_cli.hardware import accelerator, count_flops, peak_flops, synchronize
from sift_cli.interrupts import check_interrupted
from sift_cli.records import DIAGNOSTICS, Recorder
from sift_cli.selection import FEATURE_CRITERIA, overlap, random_subset, select, spearman, top

log = logging.getLogger("sift_cli")


class Clock:
    """Wall-clock of training only: running between start() and stop(), paused for everything else."""

    def __init__(self, device: torch.device, total: float = 0.0):
        self.device, self.total, self.since = device, total, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> float:
        if self.since is None:  # already stopped (a stop request during an evaluation)
            return self.total
        synchronize(self.device)  # queued kernels belong to the time just measured
        self.total += time.perf_counter() - self.since
        self.since = None
        return self.total

    def peek(self) -> float:
        # no synchronisation: off by at most the work still queued on the GPU, fine for a budget check
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def advance(self, seconds: float) -> None:
        self.total += seconds


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off and batch-norm statistics frozen, for evaluation and diagnostics."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def take(batch: dict, index: Tensor) -> dict:
    return {k: v[index] for k, v in batch.items()}


def rows(batch: dict) -> int:
    return next(iter(batch.values())).shape[0]


def to_device(batch: dict, device: torch.device) -> dict:
    # from pinned memory (the DataLoader pins on CUDA) the copy is asynchronous: the host queues the step
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts: bf16 on CUDA where supported (precision=auto), fp16 where asked (with
    grad_scaler_for's loss scaling), fp32 otherwise."""
    bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if precision == "auto" and device.type == "cuda" and not bf16:  # a V100 or T4: several times slower in fp32
        warnings.warn(f"trainer.precision=auto: {torch.cuda.get_device_name(device)} has no bf16, so training runs "
                      f"in fp32; trainer.precision=fp16 trains in fp16 with loss scaling")
    if precision == "fp16" and device.type == "cpu":  # a user trying a GPU setting locally should know
        warnings.warn("trainer.precision=fp16 on a CPU: most CPUs have no fast fp16 arithmetic, so this trains "
                      "several times slower than fp32; fp16 is meant for GPUs without bf16")
    return functools.partial(torch.autocast, device_type=device.type,
                             dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                             enabled=bf16 or precision == "fp16")


def grad_scaler_for(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling, which skips the updates whose gradients overflowed; disabled (a pass-through) at any
    other precision, so the step has one path. With a fused optimizer it reads nothing back to the host."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def lr_factor(progress: float, warmup: float, horizon: Optional[float], shape: str) -> float:
    """The learning rate's multiplier at `progress` (steps, samples or seconds): linear warm-up, then a shape.

    Written here rather than taken from torch's LRScheduler, which counts its own calls: the
    schedule must follow the unit the arms are compared in, so it is a function of progress alone."""
    if progress < warmup:
        return progress / warmup
    if shape in ("constant", "constant_with_warmup"):
        return 1.0
    t = min(1.0, (progress - warmup) / max(horizon - warmup, 1e-12))
    return 1.0 - t if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


# --- batches: a DataLoader over step numbers ---------------------------------------------------


class Gate:
    """Lets DataLoader workers prepare batches only while the training clock runs.

    Workers that kept prefetching during an evaluation would hand the next steps batches made off
    the clock. close() waits, on the clock, until no worker is inside a batch, and holds new ones
    back until open(); the time a step then waits for its batch is training time, as it should be.
    """

    def __init__(self):
        ctx = worker_context()  # the workers' own: shared memory made by another may not reach them
        self._open, self._busy = ctx.Event(), ctx.Value("i", 0)
        self._open.set()

    def __enter__(self):
        parent = multiprocessing.parent_process()  # None in the main process
        while True:
            # a worker waits for open() only while the process that started it lives: one killed with the gate
            # closed (an OOM kill mid-evaluation) never opens it, and torch's own check of the parent runs only
            # between batches, so the worker would live on, holding the run's output pipes
            while not self._open.wait(timeout=1.0):
                if parent is not None and (os.getppid() != parent.pid or not parent.is_alive()):
                    os._exit(0)
            with self._busy.get_lock():
                if self._open.is_set():
                    self._busy.value += 1
                    return

    def __exit__(self, *exc):
        with self._busy.get_lock():
            self._busy.value -= 1

    def close(self) -> None:
        with self._busy.get_lock():
            self._open.clear()
        while self._busy.value:
            time.sleep(0.001)

    def open(self) -> None:
        self._open.set()


class StepBatches(Dataset):
    """Item s is this process's share of global batch s: a pure function of (seed, step, rank)."""

    def __init__(self, data, batch_size: int, seed: int, gate: Optional[Gate]):
        self.data, self.batch_size, self.seed, self.gate = data, batch_size, seed, gate
        self.rank, self.world = distributed.rank(), distributed.world()

    def __getitem__(self, step: int) -> dict:
        with self.gate or contextlib.nullcontext():
            return self.data.train_batch(step, self.batch_size, self.seed, self.rank, self.world)


def batch_stream(data, batch_size: int, seed: int, start: int, device: torch.device,
                 gate: Optional[Gate]) -> Iterator[dict]:
    """Batches of steps start, start+1, ..., prepared ahead by data.num_workers workers (pinned on CUDA)."""
    workers = data.num_workers
    loader = DataLoader(StepBatches(data, batch_size, seed, gate if workers else None), batch_size=None,
                        sampler=itertools.count(start), num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, worker_init_fn=worker_signals if workers else None,
                        multiprocessing_context=worker_context() if workers else None)
    return iter(loader)


# --- the step -------------------------------------------------------------------------------


@dataclass
class Selection:
    """How a step picks its rows: the arm's knobs and, across processes, the scope of the top-k."""

    frac: float
    criterion: str
    scored: int  # rows this process draws and scores per step
    kept: int  # rows this process back-propagates per step
    seed: int
    scope: str  # local: each process keeps its own top-k; global: the top-k of the whole batch
    device: torch.device
    world: int = 1
    rank: int = 0
    exit_layer: int = 1
    batch_mode: str = "scored"
    # the schedule: steps in [start, end) of the budget select, one in every `every`
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    micro: int = 1  # micro-batches a step's update runs in (trainer.accumulate)

    @classmethod
    def for_run(cls, cfg, device: torch.device, depth: int) -> "Selection":
        """What a run's config asks of this process: its share of trainer.batch_size, scored and kept."""
        t, world = cfg.trainer, distributed.world()
        scored, kept = step_sizes(t.batch_size // world, cfg.frac, t.batch_mode)
        if kept == scored and cfg.frac < 1:  # a batch too small to leave a row out
            warnings.warn(f"frac={cfg.frac} keeps all {kept} rows of a batch of {scored} per process "
                          f"(trainer.batch_size={t.batch_size}): this arm updates on every row as vanilla does, "
                          f"after a selection that drops none; raise trainer.batch_size")
        whole = step_sizes(t.batch_size, cfg.frac, t.batch_mode)
        if world > 1 and t.batch_mode == "scored" and kept < scored and world * kept != whole[1]:
            warnings.warn(f"frac={cfg.frac} over {world} processes back-propagates {world} x {kept} of {world * scored}"
                          f" rows a step, not {whole[1]} of {whole[0]}: every process takes an equal share, rounded "
                          f"up (samples_backpropagated records it); to avoid it, choose frac and trainer.batch_size "
                          f"so that frac x batch_size divides by {world}")
        if kept < t.accumulate:
            raise ConfigError(f"trainer.accumulate={t.accumulate} splits the {kept} rows a process back-propagates "
                              f"per step into more micro-batches than rows; use trainer.accumulate={kept} or less, "
                              f"or a larger trainer.batch_size")
        return cls(cfg.frac, cfg.criterion, scored, kept, cfg.seed, t.selection_scope, device, world,
                   distributed.rank(), exit_block(cfg.exit_layer, depth), t.batch_mode, cfg.selection.start,
                   cfg.selection.end, cfg.selection.every, t.accumulate)

    @property
    def plain(self) -> int:
        """Rows a step that does not select back-propagates: all it drew, or with batch_mode=updated the B it
        would have kept (the first B of those drawn), as vanilla's step."""
        return self.scored if self.batch_mode == "scored" else self.kept

    def selects(self, progress: Optional[float], step: int) -> bool:
        """Whether step `step` scores and selects, at `progress` (the share of the budget spent, in the schedule's
        unit; None when the budget has no end in it, which the config allows only for the whole-run window).
        Vanilla never does."""
        inside = progress is None or self.start <= progress and (progress < self.end or self.end >= 1)
        return self.frac < 1 and inside and step % self.every == 0

    @property
    def kinds(self) -> tuple[bool, ...]:
        """The kinds of step this run takes (True: one that selects), each counted and compiled before training."""
        if self.frac >= 1:
            return (False,)
        return (True,) if (self.start, self.end, self.every) == (0, 1, 1) else (True, False)

    @property
    def gathered(self) -> bool:
        return self.scope == "global" and self.world > 1

    def generator(self, step: int) -> torch.Generator:
        """The random draws of a step (random arm, loss_proportional): the same on every rank when global."""
        key = ("select", step) if self.gathered or self.world == 1 else ("select", step, self.rank)
        return seeded(self.seed, *key, device=self.device)

    def keep(self, scores: Optional[Tensor], features: Optional[Tensor], step: int) -> Tensor:
        """Indices of the rows to back-propagate: into this process's rows, or everyone's when global."""
        n, kept = (self.scored * self.world, self.kept * self.world) if self.gathered else (self.scored, self.kept)
        if self.criterion == "random":
            return random_subset(n, kept, self.generator(step))
        return select(scores, kept, self.criterion, self.generator(step), features, self.frac)

    def share(self, keep: Tensor) -> Tensor:
        """This process's equal share of a global selection (its own selection when local)."""
        if not self.gathered:
            return keep
        return keep.sort().values[self.rank * self.kept:(self.rank + 1) * self.kept]


def train_step(model, score_fn: Callable, batch: dict, optimizer: Optional[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, autocast, sel: Selection, step: int,
               selecting: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """One step: score -> select -> update. Returns the loss and, when scored, (sum of scores, sum kept).
    A step outside the selection schedule (`selecting` false) is vanilla's. Selection is over the whole batch;
    with trainer.accumulate the kept rows are back-propagated in that many micro-batches, each weighted by its
    share of the rows, so the gradient is the whole batch's. Without an optimizer, the pass stops after the
    backward (counting FLOPs, compiling)."""
    score_sums = None
    if selecting and sel.frac < 1:  # vanilla, and a step the schedule leaves out, never scores
        scores = features = None
        if sel.criterion != "random":
            with autocast():
                scores, features = score_fn(batch)
            if sel.gathered:  # every rank sees every score and selects the same global top-k
                scores = distributed.all_gather(scores)
                features = None if features is None else distributed.all_gather(features)
        keep = sel.keep(scores, features, step)
        if scores is not None:
            score_sums = torch.stack([scores.sum(), scores[keep].sum()])
        if sel.gathered:
            batch = {k: distributed.all_gather(v) for k, v in batch.items()}
        batch = take(batch, sel.share(keep))
    elif sel.plain < sel.scored:  # batch_mode=updated: B of the rows drawn, a static slice
        batch = {k: v[:sel.plain] for k, v in batch.items()}
    total, parts, loss = rows(batch), sel.micro, None
    for i, part in enumerate(micro_batches(batch, parts)):
        with distributed.no_sync(model) if i < parts - 1 else contextlib.nullcontext():  # reduce once, at the last
            with autocast():
                part_loss = model(part)  # the model's (or DDP's) call is its training loss
            if parts > 1:
                part_loss = part_loss * (rows(part) / total)
            scaler.scale(part_loss).backward()  # fp16: scaled, so that small gradients do not flush to zero
        loss = part_loss.detach() if loss is None else loss + part_loss.detach()
    if optimizer is not None:
        scaler.step(optimizer)  # fp16: unscaled, and skipped when a gradient overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    # a copy: under CUDA graphs (compile_mode=reduce-overhead) the next replay overwrites the graph's output,
    # and the window keeps losses until an evaluation
    return loss.clone(), score_sums


def micro_batches(batch: dict, parts: int) -> list[dict]:
    """The batch in `parts` consecutive slices whose sizes differ by one row at most (static: a function of the
    row count alone)."""
    if parts == 1:
        return [batch]
    split = {k: v.tensor_split(parts) for k, v in batch.items()}
    return [{k: v[i] for k, v in split.items()} for i in range(parts)]


def scorer(model, exit_layer: int, criterion: str, compile_fn: Optional[Callable] = None) -> Callable:
    """The cheap pass as a function of the batch: (scores, features or None), without gradients, in the
    model's scoring mode. The mode is entered outside what compile_fn compiles: it changes module flags."""
    if criterion in FEATURE_CRITERIA:
        def cheap_pass(batch):
            return model.exit_scores(batch, exit_layer, criterion, features=True)
    else:
        def cheap_pass(batch):
            return model.exit_scores(batch, exit_layer, criterion), None
    cheap_pass = compile_fn(cheap_pass) if compile_fn else cheap_pass

    def score(batch):
        with torch.no_grad(), model.scoring_mode():
            return cheap_pass(batch)
    return score


@contextlib.contextmanager
def restored(model, optimizer):
    """Run a step's forward and backward (without its update) leaving no trace: buffers (batch-norm
    statistics) and gradients are put back, so counting or compiling changes no state."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        model.load_state_dict(buffers, strict=False)
        optimizer.zero_grad(set_to_none=True)


@dataclass
class Step:
    """train_step bound to a run's model (wrapped, compiled or not), scoring pass, optimizer, gradient scaler and
    selection: a function of (batch, step number), with what was learnt about it before the clock started."""

    model: Callable  # whose call is the training loss: the module, DDP's wrapper or torch.compile's
    score: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable
    sel: Selection
    flops: dict = field(default_factory=dict)  # model FLOPs of one step of each kind (True: selecting)
    compiled: bool = False
    cuda_graphs: bool = False  # every compiled graph replayed as a CUDA graph
    compile_time_s: float = 0.0

    def __call__(self, batch: dict, step: int, update: bool = True, selecting: bool = True
                 ) -> tuple[Tensor, Optional[Tensor]]:
        return train_step(self.model, self.score, batch, self.optimizer if update else None, self.scaler,
                          self.autocast, self.sel, step, selecting)

    def flops_of(self, steps: int, selected: int) -> int:
        """Model FLOPs of `steps` steps of which `selected` selected."""
        return selected * self.flops.get(True, 0) + (steps - selected) * self.flops.get(False, 0)


def prepare_step(model, cfg, optimizer, scaler: torch.amp.GradScaler, sel: Selection, autocast, batch: dict,
                 step: int, device: torch.device) -> Step:
    """The run's step, ready before the clock starts: its FLOPs counted once on a batch, then compiled if
    trainer.compile asks (auto: on CUDA); neither changes any state."""
    core = distributed.unwrap(model)
    run_step = Step(model, scorer(core, sel.exit_layer, cfg.criterion), optimizer, scaler, autocast, sel)
    for selecting in sel.kinds:
        with restored(core, optimizer):
            run_step.flops[selecting] = count_flops(functools.partial(run_step, batch, step, False, selecting))
    asked = str(cfg.trainer.compile).lower()
    if asked == "true" or (asked == "auto" and device.type == "cuda"):
        run_step = compile_step(run_step, cfg, batch, step, device)
    return run_step


def compile_mode(asked: Optional[str], device: torch.device) -> Optional[str]:
    """trainer.compile_mode as torch.compile takes it. auto: CUDA graphs for one CUDA process (on an H200 they
    trained as eager and made every arm faster); torch.compile's default on a CPU, which has no graphs, and
    under torchrun, where CUDA graphs with DDP are untested here."""
    if asked == "auto":
        return "reduce-overhead" if device.type == "cuda" and distributed.world() == 1 else None
    return asked


def compile_step(eager: Step, cfg, batch: dict, step: int, device: torch.device) -> Step:
    """torch.compile the scoring pass and the training forward/backward, warmed up on a batch before the
    clock starts (state restored afterwards). A failure falls back to eager with a one-line warning; CUDA
    graphs asked for but left out (a CPU, mutated buffers such as batch norm's) cost a one-line warning too,
    since torch.compile itself says so only under TORCH_LOGS=cudagraphs (under compile_mode=auto, a log line:
    the user did not ask, and summary.json's cuda_graphs says it)."""
    from torch._dynamo.utils import counters  # where inductor counts the graphs it could not capture

    mode = compile_mode(cfg.trainer.compile_mode, device)
    graphs = bool(mode and "reduce-overhead" in mode)
    compile_fn = functools.partial(torch.compile, mode=mode, dynamic=False)
    core = distributed.unwrap(eager.model)
    skips, start = counters["inductor"]["cudagraph_skips"], time.perf_counter()
    log.info("compiling the step (torch.compile, mode %s) before the training clock starts", mode or "default")
    try:
        compiled = dataclasses.replace(eager, model=compile_fn(eager.model), compiled=True,
                                       score=scorer(core, eager.sel.exit_layer, cfg.criterion, compile_fn))
        # each kind of step the schedule takes (its own shapes: its own graphs), so none compiles on the clock
        for selecting, _ in itertools.product(eager.sel.kinds, range(3 if graphs else 1)):  # CUDA graphs record late
            with restored(core, eager.optimizer):
                compiled(batch, step, False, selecting)
        synchronize(device)
    except torch.cuda.OutOfMemoryError:  # the batch, not the compiler: eager would run out too
        raise
    except Exception as err:  # an unsupported op or backend: eager still trains correctly
        warnings.warn(f"trainer.compile: torch.compile failed ({type(err).__name__}: {first_line(err)}); "
                      f"training eagerly")
        return eager
    compiled.cuda_graphs = graphs and counters["inductor"]["cudagraph_skips"] == skips
    if graphs and not compiled.cuda_graphs:
        tell = log.info if cfg.trainer.compile_mode == "auto" else warnings.warn
        tell(f"trainer.compile_mode={mode}: torch.compile left CUDA graphs out of "
             f"{counters['inductor']['cudagraph_skips'] - skips} compiled graph(s) on {device.type} "
             f"(TORCH_LOGS=cudagraphs says why); those run compiled, without CUDA graphs")
    compiled.compile_time_s = time.perf_counter() - start
    log.info("compiled in %.1f s (compile_time_s, not training time)", compiled.compile_time_s)
    return compiled


# --- evaluation and diagnostics ---------------------------------------------------------------


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], autocast, device: torch.device) -> dict:
    """Validation accuracy and loss from the sums of every process's shard, reduced exactly."""
    with eval_mode(model), autocast():
        sums = [model.evaluate(to_device(b, device)) for b in batches]
    keys = sorted(sums[0])
    total = distributed.all_reduce_sum(torch.stack([sum(s[k] for s in sums).double() for k in keys]))
    total = dict(zip(keys, total.tolist()))
    row = {"val_acc": total["correct"] / total["count"], "val_loss": total["loss_sum"] / total["count"]}
    # extra accuracies a model reports, e.g. an exit head's "exit_correct" -> "val_exit_acc"
    row.update({f"val_{k[:-len('_correct')]}_acc": v / total["count"] for k, v in total.items()
                if k.endswith("_correct")})
    return row


@torch.no_grad()
def diagnose(model, probe: dict, frac: float, criterion: str, autocast) -> dict:
    """How well each exit layer's score ranks the probe batch against the exact per-sample loss.

    The exact loss is taken as the update sees it (batch-norm layers normalising by the batch); a model
    with a choice of statistics for scoring (ResNet's score_bn) also reports the other choice's ranking."""
    criterion = criterion if criterion in ("loss", "entropy", "gradnorm") else "loss"
    keep = step_sizes(rows(probe), frac, "scored")[1]
    modes = [getattr(model, "score_bn", None)]
    if modes[0] is not None:
        modes.append("running" if modes[0] == "batch" else "batch")
    row = {}
    with autocast():
        with model.scoring_mode("batch" if modes[0] else None):
            exact = model.exit_scores(probe, model.depth, "loss")
        for mode in modes:
            suffix = "" if mode == modes[0] else f"_{mode}"
            with model.scoring_mode(mode):
                scores = {k: model.exit_scores(probe, k, criterion) for k in range(1, model.depth + 1)}
            for k, s in scores.items():
                row[f"spearman_k{k}{suffix}"] = spearman(s, exact)
                row[f"overlap_k{k}{suffix}"] = overlap(top(s, keep), top(exact, keep))
    return row


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress]:
    """The training bar on a terminal. While it shows, log lines (one per evaluation) to the terminal go through
    rich's stand-in for the stream, so that they print above the bar rather than into it."""
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("{task.fields[rate]:,.0f} samples/s"), TextColumn("{task.fields[mfu]}"),
               TextColumn("val_acc {task.fields[val_acc]}"), TimeElapsedColumn()]
    with Progress(*columns, disable=not enabled, transient=False) as bar:
        stand_ins = {sys.__stdout__: sys.stdout, sys.__stderr__: sys.stderr}  # rich's, while the bar shows
        handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler
                    and stand_ins.get(h.stream, h.stream) is not h.stream]
        streams = [h.setStream(stand_ins[h.stream]) for h in handlers]
        try:
            yield bar
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)


# --- stopping: budgets, preemption signals, Ctrl-C ------------------------------------------


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Request(enum.IntEnum):
    """What the stop signals ask of the loop. Ordered: across ranks, the strongest request wins."""

    NONE = 0
    INTERRUPT = 1  # the first Ctrl-C: evaluate, record and checkpoint
    PREEMPT = 2  # SIGTERM, SIGUSR1, SIGUSR2: checkpoint within the grace period, then hand the signal on


class StopRequests:
    """Signals set a flag; the loop acts on it at the next step boundary (nothing is saved in a handler).

    SIGTERM, SIGUSR1 and SIGUSR2 (SLURM, submitit) ask for a checkpoint and a requeue; the first Ctrl-C
    asks to evaluate, record and checkpoint; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.request, self.signum, self._previous = Request.NONE, None, {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.request == Request.INTERRUPT:
                raise KeyboardInterrupt
            print("interrupted: stopping after this step to evaluate, record and checkpoint "
                  "(Ctrl-C again to abort)", file=sys.stderr)
        self.request = max(self.request, Request.INTERRUPT if signum == signal.SIGINT else Request.PREEMPT)
        self.signum = self.signum or signum

    def __enter__(self):
        check_interrupted()  # a Ctrl-C swallowed while the step compiled
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, *PREEMPTION_SIGNALS):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- the training state -----------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything the next step depends on besides the model's and optimizer's tensors.

    Data order, masking, augmentation, the random arm's draws and dropout are pure functions of
    (seed, step, rank), so none of their states is here: the step number stands for all of them."""

    step: int = 0
    samples_seen: int = 0
    samples_backpropagated: int = 0
    selected_steps: int = 0  # steps that selected (the schedule may leave some out)
    samples_scored: int = 0  # samples through the cheap pass
    train_time_s: float = 0.0
    data_time_s: float = 0.0
    lost_time_s: float = 0.0  # training time thrown away by kills, after their last checkpoint
    earlier_wall_time_s: float = 0.0
    restarts: int = 0
    ran_on: list = field(default_factory=list)  # "<accelerator> x<processes>" of each stretch, when they differ
    last_eval_step: Optional[int] = None
    next_eval_s: Optional[float] = None
    next_checkpoint_s: Optional[float] = None
    window: list = field(default_factory=list)  # (loss, score sums) of the steps since the last evaluation

    def to_json(self) -> dict:
        state = asdict(self)
        state["window"] = [[loss.item(), None if s is None else s.tolist()] for loss, s in self.window]
        return state

    @classmethod
    def from_json(cls, state: dict, device: torch.device) -> "TrainState":
        state = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        state["window"] = [(torch.tensor(loss, device=device),
                            None if s is None else torch.tensor(s, device=device)) for loss, s in state["window"]]
        return cls(**state)


def restore(model, optimizer, scaler: torch.amp.GradScaler, resumed: Optional[tuple[dict, dict]],
            checkpointer: Checkpointer, device: torch.device) -> TrainState:
    """The training state to go on from: a checkpoint's (loaded into model, optimizer and scaler) or a fresh
    one, with the restart counted and, where a process trained here after its last checkpoint, that time as
    lost."""
    state = TrainState()
    if resumed is not None:
        tensors, saved = resumed
        model.load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors["optimizer"])
        if scaler.is_enabled():  # fp16: the loss scale it had reached (trainer.precision cannot change on resume)
            scaler.load_state_dict(tensors["scaler"])
        state = TrainState.from_json(saved["train_state"], device)
    if not distributed.is_main():  # the main process alone keeps the run's record of restarts
        return state
    clock_at_kill = checkpointer.clock()  # where the clock stood when the last process ended
    if clock_at_kill:  # the toll of earlier kills, where that process ended before its next checkpoint
        state.lost_time_s = max(state.lost_time_s, clock_at_kill.get("lost_time_s", 0.0))
        state.restarts = max(state.restarts, clock_at_kill.get("restarts", 0))
    if resumed is not None or clock_at_kill:
        state.restarts += 1
    if clock_at_kill and clock_at_kill["train_time_s"] > state.train_time_s:
        state.lost_time_s += clock_at_kill["train_time_s"] - state.train_time_s
    checkpointer.write_clock(state.step, state.train_time_s, state.lost_time_s, state.restarts, every_s=0)
    return state


class Training:
    """One run in training: its state, clock, records and checkpoints, and what fit()'s loop does between steps
    (the learning rate, evaluations, diagnostics, checkpoints), one method each."""

    def __init__(self, model, data, cfg, record: Recorder, checkpointer: Checkpointer,
                 resumed: Optional[tuple[dict, dict]], device: torch.device, meta: dict):
        """Ready to train: the selection, optimizer, gradient scaler and state (a checkpoint's, or fresh), the
        model wrapped for several processes, this process's validation shard, and the data workers' gate."""
        t, world, rank = cfg.trainer, distributed.world(), distributed.rank()
        self.sel = Selection.for_run(cfg, device, model.depth)
        if data.num_train < self.sel.scored * world:
            raise ConfigError(f"trainer.batch_size draws {self.sel.scored * world} samples per step but the training "
                              f"set has {data.num_train}; use a smaller batch or more data")
        self.optimizer = instantiate(t.optimizer)(params=model.parameters())
        # the config's rates, read before restore(): a checkpoint's param groups hold scheduled ones
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = grad_scaler_for(t.precision, device)
        self.state = restore(model, self.optimizer, self.scaler, resumed, checkpointer, device)
        if resumed and "selected_steps" not in resumed[1]["train_state"] and self.sel.frac < 1:
            # saved before selection schedules: every step it took selected
            self.state.selected_steps = self.state.step
            self.state.samples_scored = self.state.samples_seen if self.sel.criterion != "random" else 0
        here = f"{accelerator(device)} x{world}"
        if self.state.ran_on[-1:] != [here]:
            self.state.ran_on.append(here)
        if len(self.state.ran_on) > 1:  # resumed elsewhere: its time is no one machine's, nor is it compared as one
            record.about["accelerator"] = ", then ".join(self.state.ran_on)
        self.model, self.core = distributed.wrap(model, device), model
        self.val = data.val_batches(t.eval_batch_size, rank, world)  # on the host, each batch moved as it is scored
        if distributed.agree_max([float(not len(self.val))])[0]:  # refused on every rank: none waits for the rest
            raise ConfigError(f"the validation set has too few samples to give each of {world} processes one")
        self.probe = to_device(next(iter(self.val)), device)  # the diagnostics' batch
        self.gate = Gate() if data.num_workers else None
        self.num_train = data.num_train
        self.cfg, self.record, self.checkpointer, self.device, self.meta = cfg, record, checkpointer, device, meta
        self.autocast = autocast_for(t.precision, device)
        self.clock, self.wall_start = Clock(device, self.state.train_time_s), time.perf_counter()
        self.elapsed = self.state.train_time_s  # the training time every rank agrees on: agree() keeps it
        self.request = Request.NONE  # the strongest stop request every rank has seen: agree() keeps it
        self.horizon = {"steps": t.max_steps, "time": t.max_time_s,
                        "samples": t.max_steps * t.batch_size if t.max_steps else None}[t.schedule_unit]
        self.step_fn: Optional[Step] = None  # prepare() sets it
        self.peak = peak_flops(device)
        # where the current evaluation window began: step, selected steps, training time
        self.marks = (self.state.step, self.state.selected_steps, self.state.train_time_s)

    def prepare(self, batch: dict) -> Step:
        self.step_fn = prepare_step(self.model, self.cfg, self.optimizer, self.scaler, self.sel, self.autocast,
                                    batch, self.state.step, self.device)
        return self.step_fn

    def progress(self) -> float:
        """How far training has come, in the unit the arms are compared in (trainer.schedule_unit): the agreed
        clock's time, steps or samples back-propagated, the same on every rank."""
        state = self.state
        return {"steps": state.step, "samples": state.samples_backpropagated,
                "time": self.elapsed}[self.cfg.trainer.schedule_unit]

    def set_lr(self) -> None:
        """The schedule at this step's progress."""
        t = self.cfg.trainer
        factor = lr_factor(self.progress(), t.warmup, self.horizon, t.scheduler)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def selects(self) -> bool:
        """Whether this step selects, by the selection schedule at this step's progress."""
        return self.sel.selects(self.progress() / self.horizon if self.horizon else None, self.state.step)

    def wall_time(self) -> float:
        return self.state.earlier_wall_time_s + time.perf_counter() - self.wall_start

    def throughput(self) -> dict:
        """Model TFLOP/s (and MFU on a GPU with a known peak) since the last evaluation."""
        state = self.state
        steps, selected = state.step - self.marks[0], state.selected_steps - self.marks[1]
        seconds = self.clock.total - self.marks[2]
        self.marks = (state.step, state.selected_steps, self.clock.total)
        if not steps or seconds <= 0:
            return {}
        tflops = self.step_fn.flops_of(steps, selected) / seconds / 1e12
        return {"tflops": tflops, **({"mfu": tflops * 1e12 / self.peak} if self.peak else {})}

    def settle_window(self) -> None:
        """Average the window's losses and score sums over the ranks. Each rank trains and scores as many rows,
        so the mean of their means is the mean over the global batch; averaging again changes nothing, so a
        window settled for a checkpoint and settled again at the next evaluation stays the same."""
        world, window = self.sel.world, self.state.window
        if world == 1 or not window:
            return
        losses, sums = zip(*window)
        losses = distributed.all_reduce_sum(torch.stack(losses)) / world
        scored = [s for s in sums if s is not None]  # the steps that scored: the same ones on every rank
        settled = iter((distributed.all_reduce_sum(torch.stack(scored)) / world).unbind() if scored else ())
        self.state.window = list(zip(losses.unbind(), [None if s is None else next(settled) for s in sums]))

    def window_scores(self) -> dict:
        """The mean score of the kept and of the dropped samples over the window's steps."""
        sel, sums = self.sel, [s for _, s in self.state.window if s is not None]
        if not sums or sel.scored == sel.kept:
            return {}
        total, kept_sum = torch.stack(sums).sum(0).tolist()
        n_kept, n_scored = (sel.kept * sel.world, sel.scored * sel.world) if sel.gathered else (sel.kept, sel.scored)
        return {"score_kept": kept_sum / (len(sums) * n_kept),
                "score_dropped": (total - kept_sum) / (len(sums) * (n_scored - n_kept))}

    def evaluate(self) -> dict:
        """Validate, record a row with the window's training figures, and start a new window."""
        state = self.state
        kill_point("evaluation", state.step)
        self.settle_window()
        distributed.average_buffers(self.core)  # one model for every rank's validation shard
        losses = [loss for loss, _ in state.window]
        row = {"step": state.step, "train_time_s": self.clock.total, "wall_time_s": self.wall_time(),
               "samples_seen": state.samples_seen, "samples_backpropagated": state.samples_backpropagated,
               "samples_scored": state.samples_scored, "selected_steps": state.selected_steps,
               **evaluate(self.core, self.val, self.autocast, self.device),
               "train_loss": torch.stack(losses).mean().item() if losses else None,
               "lr": self.optimizer.param_groups[0]["lr"], "data_time_s": state.data_time_s,
               **self.throughput(), **self.window_scores()}
        if self.scaler.is_enabled():  # fp16: a scale that keeps falling means gradients keep overflowing
            row["loss_scale"] = self.scaler.get_scale()
        state.window.clear()
        state.last_eval_step = state.step
        state.next_eval_s = self.after(self.cfg.trainer.eval_every_s)
        self.record.log(row)
        if distributed.is_main():  # the one process that writes summary.json
            self.record.progress(self.totals(records.RUNNING))
            # a line per evaluation in the log: a run without a terminal (a sweep, a cluster job) shows its pulse
            speed = f"MFU {row['mfu']:.1%}" if "mfu" in row else f"{row['tflops']:.3g} TFLOP/s" if "tflops" in row \
                else ""
            log.info("step %d | train %.1f s | val_acc %.4f | val_loss %.4f | %.0f samples/s%s", state.step,
                     self.clock.total, row["val_acc"], row["val_loss"],
                     state.samples_seen / self.clock.total if self.clock.total else 0.0,
                     f" | {speed}" if speed else "")
        return row

    def diagnose(self) -> None:
        """Exit-layer diagnostics on the main process's probe batch: a sample, not a sum to reduce."""
        if distributed.is_main():
            self.record.log({"step": self.state.step, "train_time_s": self.clock.total,
                             **diagnose(self.core, self.probe, self.cfg.frac, self.cfg.criterion, self.autocast)},
                            DIAGNOSTICS)

    def checkpoint(self) -> None:
        state = self.state
        state.train_time_s = self.clock.total
        state.next_checkpoint_s = self.after(self.cfg.trainer.checkpoint_every_s)
        self.settle_window()  # the window saved is the global one, whichever rank count resumes it
        distributed.average_buffers(self.core)  # the statistics of every rank's batches, not rank 0's alone
        if distributed.is_main():
            saved = state.to_json()
            saved["earlier_wall_time_s"] += time.perf_counter() - self.wall_start
            tensors = {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.scaler.is_enabled():
                tensors["scaler"] = self.scaler.state_dict()
            self.checkpointer.save(state.step, tensors, {**self.meta, "train_state": saved,
                                                         "positions": self.record.positions(),
                                                         "world_size": self.sel.world})
        distributed.barrier()

    def after(self, every_s: Optional[float]) -> float:
        """The training time at which a task due every `every_s` training seconds falls due next."""
        return self.elapsed + (every_s or math.inf)

    def agree(self, stop: StopRequests) -> None:
        """One training time and one stop request for every rank, after each step and each pause: the slowest
        rank's clock (every rank's clock moves on to it) and the strongest request so far. Whatever depends on
        time (the learning rate, evaluations, checkpoints, the budget) reads this time, and whatever a request
        stops, it stops on every rank: no two ranks decide differently."""
        self.elapsed, strongest = distributed.agree_max([self.clock.peek(), stop.request])
        # a running clock has already counted the wait for the slowest rank: add only what it still lacks
        self.clock.advance(max(0.0, self.elapsed - self.clock.peek()))
        self.request = max(self.request, Request(int(strongest)))

    @contextlib.contextmanager
    def off_clock(self, stop: StopRequests):
        """Work between steps, off the training clock, with the data workers held back (see Gate). Every rank
        restarts its clock when all are done (agree() waits for them, and takes a stop asked for meanwhile):
        the main process's own work (records, diagnostics) is no rank's training time. The gate reopens
        whatever the work raises: workers left waiting at it would hold up the exit."""
        if self.gate:
            self.gate.close()
        self.clock.stop()
        try:
            yield
            self.agree(stop)
        finally:
            self.clock.start()
            if self.gate:
                self.gate.open()

    def totals(self, status: str, signum: Optional[int] = None) -> dict:
        """The run's totals, for summary.json."""
        # the main process holds every row; the others only those since they started
        state, sel, rows = self.state, self.sel, self.record.rows
        return {
            "status": status,
            "stop_signal": signum,
            "steps": state.step,
            "train_time_s": self.clock.total,
            "wall_time_s": self.wall_time(),
            "lost_time_s": state.lost_time_s,
            "restarts": state.restarts,
            "data_time_s": state.data_time_s,
            "compiled": self.step_fn.compiled,  # false where the compile fell back to eager
            "cuda_graphs": self.step_fn.cuda_graphs,
            "compile_time_s": self.step_fn.compile_time_s,
            # the mean over the steps taken, of either kind: times the steps, the run's model FLOPs
            "flops_per_step": self.step_fn.flops_of(state.step, state.selected_steps) / max(state.step, 1),
            "selected_steps": state.selected_steps,
            "samples_seen": state.samples_seen,
            "samples_scored": state.samples_scored,
            "samples_backpropagated": state.samples_backpropagated,
            "samples_scored_per_step": sel.scored * sel.world,
            "samples_backpropagated_per_step": sel.kept * sel.world,
            "data_passes": state.samples_seen / self.num_train,  # how many times the run read its data
            "final_val_acc": rows[-1]["val_acc"] if rows else None,
            "final_val_loss": rows[-1]["val_loss"] if rows else None,
            "best_val_acc": max((r["val_acc"] for r in rows), default=None),
        }


def fit(model, data, cfg, record: Recorder, device: torch.device, show_progress: bool,
        checkpointer: Checkpointer, resumed: Optional[tuple[dict, dict]], meta: dict) -> dict:
    """Train until a budget runs out or a stop is requested. Returns the totals for summary.json."""
    t = cfg.trainer
    world, rank = distributed.world(), distributed.rank()
    training = Training(model, data, cfg, record, checkpointer, resumed, device, meta)
    model, sel, state, gate = training.model, training.sel, training.state, training.gate
    # the one batch made off the clock: the first step's, which preparing the step needs, made here; the workers
    # start at the next step, held at the gate until the clock starts (the first off_clock() opens it)
    batch = to_device(StepBatches(data, sel.scored * world, cfg.seed, None)[state.step], device)
    step_fn = training.prepare(batch)
    if gate:
        gate.close()
    stream = batch_stream(data, sel.scored * world, cfg.seed, state.step + 1, device, gate)
    clock = training.clock

    def due(every_n_steps: Optional[int]) -> bool:
        return bool(every_n_steps) and state.step % every_n_steps == 0

    max_steps, max_time = t.max_steps or math.inf, t.max_time_s or math.inf
    with progress_bar(show_progress and distributed.is_main()) as bar, StopRequests() as stop:
        task = bar.add_task("train", total=max_time if t.max_time_s else max_steps, step=state.step, rate=0.0,
                            mfu="", val_acc=f"{record.rows[-1]['val_acc']:.4f}" if record.rows else "-")

        def show(row: dict) -> None:
            bar.update(task, val_acc=f"{row['val_acc']:.4f}", mfu=f"MFU {row['mfu']:.0%}" if "mfu" in row else
                       (f"{row['tflops']:.2f} TFLOP/s" if "tflops" in row else ""))

        with training.off_clock(stop):
            if state.last_eval_step is None:
                training.set_lr()  # the first step's rate, which the step-0 row shows
                training.evaluate()  # the starting point of every curve: step 0, time 0
            elif state.last_eval_step != state.step and (due(t.eval_every_steps) or
                                                         training.elapsed >= state.next_eval_s):
                training.evaluate()  # one a preemption skipped: made now, as a run never stopped made it
        if state.next_checkpoint_s is None:
            state.next_checkpoint_s = training.after(t.checkpoint_every_s)
        model.train()
        clock.start()
        while training.request == Request.NONE and state.step < max_steps and training.elapsed < max_time:
            if batch is None:
                waited = time.perf_counter()
                batch = to_device(next(stream), device)
                state.data_time_s += time.perf_counter() - waited
            training.set_lr()
            selecting = training.selects()
            torch.manual_seed(seed_of(cfg.seed, "dropout", state.step, rank))  # dropout: a function of the step
            state.window.append(step_fn(batch, state.step, selecting=selecting))
            batch = None
            state.step += 1
            state.samples_seen += sel.scored * world
            state.samples_backpropagated += (sel.kept if selecting else sel.plain) * world
            state.selected_steps += selecting
            state.samples_scored += sel.scored * world if selecting and sel.criterion != "random" else 0
            kill_point("step", state.step)
            training.agree(stop)
            elapsed = training.elapsed
            if distributed.is_main():
                checkpointer.write_clock(state.step, elapsed, state.lost_time_s, state.restarts)
                bar.update(task, completed=elapsed if t.max_time_s else state.step, step=state.step,
                           rate=state.samples_seen / max(elapsed, 1e-9))
            # when due (a stopped step's too: a probe is cheap), and the budget's last step's whatever every_n_steps
            # divides (not a stopped one's off the schedule: a resumed run's record is that of one never stopped)
            spent = state.step >= max_steps or elapsed >= max_time
            if due(cfg.diagnostics.every_n_steps) or (spent and cfg.diagnostics.every_n_steps):
                with training.off_clock(stop):
                    training.diagnose()
            if training.request != Request.NONE or state.step >= max_steps or elapsed >= max_time:
                break
            if due(t.eval_every_steps) or elapsed >= state.next_eval_s:
                with training.off_clock(stop):
                    show(training.evaluate())
            # a stop asked for during the evaluation checkpoints once, after the loop
            if training.request == Request.NONE and (due(t.checkpoint_every_steps) or
                                                     elapsed >= state.next_checkpoint_s):
                with training.off_clock(stop):
                    training.checkpoint()
        clock.stop()
        if gate:
            gate.open()  # workers waiting at the gate must be free to exit
        del stream
        # preempted: only the checkpoint, within the scheduler's grace period, and no evaluation off the
        # schedule, so the resumed run's rows are those of a run never stopped
        if state.last_eval_step != state.step and training.request != Request.PREEMPT:
            show(training.evaluate())
        training.checkpoint()  # at the end and on any stop
        training.agree(stop)  # a stop asked for during this last work: a sweep stops, a scheduler requeues
    if step_fn.compiled:  # a sweep runs its jobs in one process: free this run's graphs and CUDA graph pools
        torch.compiler.reset()
    status = {Request.NONE: records.COMPLETED, Request.INTERRUPT: "interrupted",
              Request.PREEMPT: "preempted"}[training.request]
    return training.totals(status, stop.signum if status != records.COMPLETED else None)
