"""The step and what surrounds it: the schedule's unit, an honest clock, compilation, throughput, small UX."""

import contextlib
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_config, sift_train, tiny_overrides
from sift_cli import distributed, hardware, trainer
from sift_cli.config import ConfigError
from sift_cli.models.bert import BertMLM
from sift_cli.records import read_metrics
from sift_cli.train import run
from sift_cli.trainer import (Clock, Gate, Request, Selection, Training, autocast_for, batch_stream, grad_scaler_for,
                              lr_factor, train_step)


@pytest.mark.parametrize("progress,shape,expected", [
    (0, "constant_with_warmup", 0.0), (5, "constant_with_warmup", 0.5), (50, "constant_with_warmup", 1.0),
    (10, "linear", 1.0), (55, "linear", 0.5), (100, "linear", 0.0), (55, "cosine", 0.5), (200, "linear", 0.0),
    (0, "constant", 1.0),
])
def test_the_schedule_is_a_function_of_progress_alone(progress, shape, expected):
    warmup = 0 if shape == "constant" else 10
    assert lr_factor(progress, warmup, 100, shape) == pytest.approx(expected)


def test_a_time_schedule_gives_every_arm_the_same_rate_at_the_same_training_second(corpus_file, tmp_path):
    """Warm-up and decay in training seconds: a cheaper-step arm does not decay sooner in time."""
    common = ["trainer.max_steps=null", "trainer.max_time_s=3", "trainer.eval_every_steps=null",
              "trainer.eval_every_s=0.5", "trainer.schedule_unit=time", "trainer.scheduler=linear",
              "trainer.warmup=0.5"]
    for arm in ("frac=0.25", "frac=1.0"):
        cfg = make_config(tiny_overrides(corpus_file, arm, *common))
        run(cfg, tmp_path / arm)
        rows = read_metrics(tmp_path / arm)
        assert len(rows) >= 3  # step 0 and at least two windows
        for before, row in zip(rows, rows[1:]):
            # the rate of the window's last step: the schedule's value at a second between the two evaluations
            grid = [before["train_time_s"] + i / 100 * (row["train_time_s"] - before["train_time_s"])
                    for i in range(101)]
            grid += [0.5] if before["train_time_s"] <= 0.5 <= row["train_time_s"] else []  # the warm-up's peak
            values = [lr_factor(t, 0.5, 3, "linear") for t in grid]
            low, high = min(values), max(values)
            assert low - 1e-6 <= row["lr"] / 1e-3 <= high + 1e-6, (arm, row)


class SlowData:
    """Batches that take 0.25 s each to make, each noting when it was made: a data-bound pipeline. Slow enough
    that the batches prefetched ungated are still being made during the pause, even on a loaded machine."""

    num_workers = 2

    def __init__(self, log: Path):
        self.log = log

    def train_batch(self, step, batch_size, seed, rank=0, world=1):
        start = time.time()
        time.sleep(0.25)
        with open(self.log, "a") as f:
            f.write(f"{start} {time.time()}\n")
        return {"x": torch.tensor([step])}


@pytest.mark.parametrize("gated", [True, False])
def test_no_batch_is_prepared_while_the_clock_is_paused(tmp_path, gated):
    """A slow evaluation (the pause) must not let data workers prepare the next batches off the clock."""
    data = SlowData(tmp_path / "made.txt")
    gate = Gate() if gated else None
    stream = batch_stream(data, 8, 0, 0, torch.device("cpu"), gate)
    assert [next(stream)["x"].item() for _ in range(2)] == [0, 1]
    if gate:
        gate.close()  # on the clock: waits for the batches being made
    paused = time.time()
    time.sleep(1.5)  # the evaluation
    resumed = time.time()
    if gate:
        gate.open()
    assert [next(stream)["x"].item() for _ in range(3)] == [2, 3, 4]  # the order of steps is kept
    made = [tuple(map(float, line.split())) for line in (tmp_path / "made.txt").read_text().splitlines()]
    during = [m for m in made if m[1] > paused and m[0] < resumed]
    if gated:
        assert during == []
    else:
        assert during  # without the gate, workers keep prefetching: what the test must be able to see
    del stream


def test_the_gate_reopens_when_work_off_the_clock_fails():
    """An evaluation that raises (out of memory) must not leave the data workers waiting at a closed gate: the
    process would then wait for them at its exit."""
    gate, clock = Gate(), Clock(torch.device("cpu"))
    clock.start()
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with Training.off_clock(SimpleNamespace(gate=gate, clock=clock), stop=None):
            raise RuntimeError("evaluation failed")
    worker = threading.Thread(target=gate.__enter__, daemon=True)  # a worker about to make a batch
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()


def test_uneven_shares_warn_only_where_the_back_propagated_count_changes(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 2)
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match=re.escape("back-propagates 2 x 2 of 8 rows a step, not 3 of 8")):
        Selection.for_run(make_config(["frac=0.3", "trainer.batch_size=8"]), cpu, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Selection.for_run(make_config(["frac=0.5", "trainer.batch_size=8"]), cpu, 2)  # 2 x 2 = ceil(0.5 x 8)
        # batch=updated back-propagates batch_size rows whatever the shares: only the scored count rounds
        Selection.for_run(make_config(["frac=0.3", "trainer.batch_size=8", "trainer.batch_mode=updated"]), cpu, 2)


ORPHANED = """
import multiprocessing, os, signal
from sift_cli.trainer import Gate

gate = Gate()
gate.close()  # an evaluation
worker = multiprocessing.Process(target=gate.__enter__)  # a data worker about to make a batch
worker.start()
print(worker.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the run killed mid-evaluation: no one will open the gate
"""


def test_a_worker_held_at_the_gate_leaves_when_its_run_is_killed():
    """Else it would live on, holding the run's output pipes: whatever reads them (a test, a job script) waits."""
    out = subprocess.run([sys.executable, "-c", ORPHANED], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL  # and the pipes closed: the worker ended
    stat = Path(f"/proc/{int(out.stdout)}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # gone, or a zombie


def test_agreeing_on_the_clock_counts_the_wait_for_the_slowest_rank_once(monkeypatch):
    """After a step every rank's clock moves on to the slowest rank's. A running clock has counted the wait for
    that rank already: counting it again would add every step's skew between the ranks to the training time."""
    def other_rank_ahead_by(seconds):
        def agree_max(values):
            time.sleep(seconds)  # this rank waits for the other one
            return [values[0] + seconds, *values[1:]]
        return agree_max

    no_stop = SimpleNamespace(request=Request.NONE)
    running = Clock(torch.device("cpu"))
    running.start()
    me = SimpleNamespace(clock=running, request=Request.NONE)
    monkeypatch.setattr(distributed, "agree_max", other_rank_ahead_by(0.2))
    Training.agree(me, no_stop)
    assert running.peek() == pytest.approx(me.elapsed, abs=0.05)
    paused = Clock(torch.device("cpu"), total=1.0)  # in a pause: nothing runs while this rank waits
    me = SimpleNamespace(clock=paused, request=Request.NONE)
    Training.agree(me, SimpleNamespace(request=Request.PREEMPT))
    assert paused.total == me.elapsed == pytest.approx(1.2) and me.request == Request.PREEMPT


def test_trainer_compile_on_the_cpu_records_its_time_and_trains(corpus_file, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sift_cli"):
        summary = run(make_config(tiny_overrides(corpus_file, "trainer.compile=true", "trainer.max_steps=3")), tmp_path)
    assert summary["status"] == "completed" and summary["compile_time_s"] > 0 and summary["steps"] == 3
    assert summary["compiled"] and not summary["cuda_graphs"]  # CUDA graphs only where asked for
    # a compile takes minutes on a GPU: the user is told what the wait is, and what it cost
    assert "compiling the step (torch.compile, mode default) before the training clock starts" in caplog.text
    assert f"compiled in {summary['compile_time_s']:.1f} s" in caplog.text
    assert summary["compile_time_s"] > summary["train_time_s"] / 100  # compiling is not free, and it is off the clock


def test_cuda_graphs_left_out_are_one_warning_and_the_run_trains_compiled(corpus_file, tmp_path):
    # on a CPU inductor captures no CUDA graph: what a user who asks for them there, or whose model mutates
    # buffers on a GPU, must be told, since torch.compile says so only under TORCH_LOGS
    with pytest.warns(UserWarning, match=r"trainer.compile_mode=reduce-overhead: torch.compile left CUDA graphs out "
                                         r"of \d+ compiled graph\(s\) on cpu \(TORCH_LOGS=cudagraphs says why\)"):
        summary = run(make_config(tiny_overrides(corpus_file, "trainer.compile=true",
                                                 "trainer.compile_mode=reduce-overhead", "trainer.max_steps=3")), tmp_path)
    assert summary["status"] == "completed" and summary["compile_time_s"] > 0 and summary["steps"] == 3
    assert summary["compiled"] and not summary["cuda_graphs"]  # the record says how the step ran


def test_compile_mode_auto_is_cuda_graphs_for_one_cuda_process_only(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trainer.compile_mode("auto", cuda) == "reduce-overhead"
    assert trainer.compile_mode("auto", cpu) is None  # no graphs on a CPU: torch.compile's default
    assert trainer.compile_mode("max-autotune", cuda) == "max-autotune" and trainer.compile_mode(None, cuda) is None
    monkeypatch.setattr(trainer.distributed, "world", lambda: 2)  # under torchrun, CUDA graphs with DDP are untested
    assert trainer.compile_mode("auto", cuda) is None


def test_cuda_graphs_left_out_under_compile_mode_auto_are_a_log_line_not_a_warning(corpus_file, tmp_path, caplog,
                                                                                   monkeypatch):
    # auto picks CUDA graphs on a GPU, where a ResNet's batch norm keeps some out: the user did not ask for them
    monkeypatch.setattr(trainer, "compile_mode", lambda asked, device: "reduce-overhead")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="sift_cli"):
        warnings.simplefilter("always")
        summary = run(make_config(tiny_overrides(corpus_file, "trainer.compile=true", "trainer.max_steps=2")), tmp_path)
    assert summary["compiled"] and not summary["cuda_graphs"]
    assert "torch.compile left CUDA graphs out" in caplog.text
    assert not [w for w in caught if "CUDA graphs" in str(w.message)]


def test_a_compile_failure_falls_back_to_eager_with_one_warning(corpus_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"trainer.compile: torch.compile failed \(RuntimeError: no compiler here\)"):
        summary = run(make_config(tiny_overrides(corpus_file, "trainer.compile=true")), tmp_path)
    assert summary["compile_time_s"] == 0 and not summary["compiled"] and summary["steps"] == 6


def test_running_out_of_memory_while_compiling_is_not_taken_for_a_compiler_failure(corpus_file, tmp_path,
                                                                                   monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: out_of_memory)
    with pytest.raises(ConfigError, match=r"ran out of memory \(CUDA out of memory. Tried to allocate 2.00 GiB\)"):
        run(make_config(tiny_overrides(corpus_file, "trainer.compile=true")), tmp_path)


class _IntoBuffer(torch.autograd.Function):
    """Writes the loss into a fixed buffer and returns that buffer, as a CUDA graph's replay returns its
    static output, which the next replay overwrites."""

    @staticmethod
    def forward(ctx, loss, buffer):
        ctx.mark_dirty(buffer)
        return buffer.copy_(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class StaticOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("out", torch.zeros(()))

    def forward(self, batch):
        return _IntoBuffer.apply((self.weight * batch["x"]).mean(), self.out.detach())  # same storage, no history


def test_the_losses_kept_until_an_evaluation_survive_the_next_step():
    model = StaticOutput()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sel = Selection(1.0, "loss", 4, 4, 0, "local", torch.device("cpu"))
    scaler = grad_scaler_for("fp32", torch.device("cpu"))
    first, _ = train_step(model, None, {"x": torch.arange(4.0)}, optimizer, scaler, contextlib.nullcontext, sel, 0)
    assert first.item() == 1.5
    second, _ = train_step(model, None, {"x": torch.full((4,), 7.0)}, optimizer, scaler, contextlib.nullcontext, sel,
                           1)
    assert model.out.item() == second.item() != 1.5 and first.item() == 1.5  # the model's output was overwritten
    assert model.weight.item() != 1.0  # the step trained through the buffer


class ScaledLoss(torch.nn.Module):
    """A product under autocast, times a factor from the batch: a huge factor overflows the scaled gradient."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 2))
        self.dtypes = []

    def forward(self, batch):
        out = batch["x"] @ self.weight
        self.dtypes.append(out.dtype)
        return out.float().sum() * batch["factor"][0]


def test_fp16_scales_the_loss_and_skips_an_update_whose_gradients_overflow():
    device = torch.device("cpu")
    model, sel = ScaledLoss(), Selection(1.0, "loss", 2, 2, 0, "local", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # as trainer.optimizer
    with pytest.warns(UserWarning, match="trainer.precision=fp16 on a CPU"):
        autocast = autocast_for("fp16", device)
    scaler = grad_scaler_for("fp16", device)
    x = torch.full((2, 2), 0.1)  # small enough that the gradient at scale 2 ** 15 is finite in fp16
    train_step(model, None, {"x": x, "factor": torch.full((2,), 1e35)}, optimizer, scaler, autocast, sel, 0)
    assert model.dtypes == [torch.float16]  # the product ran in half precision
    assert torch.equal(model.weight.detach(), torch.ones(2, 2))  # 1e35 x the scale overflows: no update
    assert scaler.get_scale() == 2.0 ** 15  # and the scale backs off from 2 ** 16
    train_step(model, None, {"x": x, "factor": torch.ones(2)}, optimizer, scaler, autocast, sel, 1)
    assert (model.weight.detach() < 1).all()  # finite gradients: the update happens
    assert scaler.state_dict()["_growth_tracker"] == 1


def test_an_fp16_run_records_its_loss_scale(corpus_file, tmp_path):
    with pytest.warns(UserWarning, match=r"trainer.precision=fp16 on a CPU: .* several times slower than fp32"):
        summary = run(make_config(tiny_overrides(corpus_file, "trainer.precision=fp16")), tmp_path)
    rows = read_metrics(tmp_path)
    assert summary["status"] == "completed" and len(rows) == 3
    assert rows[0]["loss_scale"] == 2.0 ** 16  # GradScaler's initial scale, before any step
    assert all(r["loss_scale"] > 0 for r in rows)


def test_throughput_and_mfu_are_recorded(corpus_file, tmp_path, monkeypatch):
    summary = run(make_config(tiny_overrides(corpus_file)), tmp_path / "cpu")
    rows = read_metrics(tmp_path / "cpu")
    assert summary["flops_per_step"] > 0 and all(r["tflops"] > 0 for r in rows[1:])
    assert "mfu" not in rows[-1]  # no known peak for a CPU: no MFU against a guess
    assert "loss_scale" not in rows[-1]  # fp32: no loss scaling
    monkeypatch.setattr("sift_cli.trainer.peak_flops", lambda device: 1e12)
    run(make_config(tiny_overrides(corpus_file)), tmp_path / "peak")
    rows = read_metrics(tmp_path / "peak")
    assert all(r["mfu"] == pytest.approx(r["tflops"]) and r["mfu"] > 0 for r in rows[1:])


def test_a_gpu_without_bf16_trains_in_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.warns(UserWarning, match=r"trainer.precision=auto: Tesla T4 has no bf16, so training runs in fp32"):
        autocast = autocast_for("auto", torch.device("cuda", 0))
    assert autocast.keywords["enabled"] is False  # fp32: autocast off


def test_the_known_gpus_have_a_peak_and_the_clock_waits_for_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hardware.peak_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_flops(torch.device("cuda", 0)) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert hardware.peak_flops(torch.device("cuda", 0)) == 835e12  # its own clocks: not the SXM's 989
    for name, peak in (("Tesla V100-SXM2-16GB", 125e12), ("Tesla V100-PCIE-32GB", 112e12), ("Tesla T4", 65e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert hardware.peak_flops(torch.device("cuda", 0)) == peak, name  # fp16: these cards have no bf16
    assert hardware.peak_flops(torch.device("cpu")) is None
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(True))
    clock = Clock(torch.device("mps"))
    clock.start()
    clock.stop()
    assert waited == [True]  # queued MPS work belongs to the time just measured


def test_version_and_help_name_the_app():
    out = sift_train("--version")
    assert out.returncode == 0 and out.stdout.startswith("sift-train ") and f"torch {torch.__version__}" in out.stdout
    help_text = sift_train("--help").stdout
    assert help_text.startswith("sift-train: train with SIFT") and "train is powered by Hydra" not in help_text


def test_an_unwritable_run_folder_is_one_line(corpus_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"the run folder {blocker / 'run'} is not writable"):
        run(make_config(tiny_overrides(corpus_file)), blocker / "run")


def test_the_offline_wandb_hint_names_the_folder_wandb_sync_wants_quoted(corpus_file, tmp_path, caplog):
    overrides = [o for o in tiny_overrides(corpus_file, "trainer.max_steps=2") if o != "logger=none"]
    folder = tmp_path / "with space"
    with caplog.at_level(logging.INFO, logger="sift_cli.records"):
        run(make_config(overrides + ["logger=wandb", "logger.mode=offline", f"logger.dir={folder}"]), tmp_path / "r")
    [hint] = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    quoted = re.search(r"wandb sync ('[^']*')", hint)
    assert quoted  # quoted: a path with a space survives the shell
    target = Path(quoted.group(1).strip("'"))
    assert target.name.startswith("offline-run-") and list(target.glob("*.wandb"))  # the run folder, not files/


def test_the_step_budget_and_the_math_of_kept_rows(corpus_file, tmp_path):
    summary = run(make_config(tiny_overrides(corpus_file, "frac=0.3")), tmp_path)
    assert summary["samples_backpropagated_per_step"] == math.ceil(0.3 * 8)


@pytest.mark.parametrize("arm", ["frac=1.0", "frac=0.5"])
def test_micro_batches_train_as_one_batch(arm, corpus_file, tmp_path, monkeypatch):
    """trainer.accumulate=2: the update in two micro-batches of the rows kept (selected over the whole batch),
    one optimizer step; the curve is the one-batch run's to floating-point summation order."""
    calls = []
    loss = BertMLM.loss
    monkeypatch.setattr(BertMLM, "loss", lambda self, batch: calls.append(len(batch["input_ids"])) or loss(self, batch))
    overrides = tiny_overrides(corpus_file, arm, "model.dropout=0")
    run(make_config(overrides), tmp_path / "whole")
    whole, calls[:] = list(calls), []
    run(make_config([*overrides, "trainer.accumulate=2"]), tmp_path / "micro")
    rows = 8 if arm == "frac=1.0" else 4
    assert whole == [rows] * 7 and calls == [rows // 2] * 14  # 6 steps and the FLOP count, whole or in halves
    curves = [[(r["val_loss"], r["train_loss"] or 0.0) for r in read_metrics(tmp_path / d)] for d in ("whole", "micro")]
    assert curves[1] == [pytest.approx(point, rel=1e-5) for point in curves[0]]


def test_more_micro_batches_than_rows_is_one_line(corpus_file, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.accumulate=5 splits the 4 rows a process back-propagates per "
                                          r"step into more micro-batches than rows; use trainer.accumulate=4 or less"):
        run(make_config(tiny_overrides(corpus_file, "frac=0.5", "trainer.accumulate=5")), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.accumulate=0 must be a whole number >= 1"):
        run(make_config(tiny_overrides(corpus_file, "trainer.accumulate=0")), tmp_path)
