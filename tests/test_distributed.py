"""One run over several processes (CPU, gloo): torchrun, submitit's launcher, SLURM's variables.

The equality tests set model.dropout=0: dropout masks differ per rank by design. Everything else (data
order, masking, selection) is a function of (seed, step, rank), so 2 processes with the same global
batch reproduce 1 process up to floating-point summation order.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import REPO, make_config, tiny_overrides
from sift_cli import distributed
from sift_cli.config import ConfigError
from sift_cli.records import read_metrics
from sift_cli.train import run
from sift_cli.trainer import autocast_for, evaluate

NO_DROPOUT = "model.dropout=0"
GLOBAL = "trainer.selection_scope=global"
CURVE_KEYS = ("val_loss", "val_acc", "train_loss", "samples_seen", "samples_backpropagated", "score_kept",
              "score_dropped", "selected_steps", "samples_scored")
# steps 2-5 of 6 in the window, one in two of them selecting: steps 2 and 4
WINDOW = ("selection.start=0.3", "selection.every=2")


def torchrun(*args: str, script=None, launcher=(), timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m sift_cli.train ARGS` (or a script), as a user types it."""
    target = [str(script)] if script else ["-m", "sift_cli.train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
               *target, *args]
    # a session of its own: a run that hangs past the timeout is killed with its workers, not only torchrun
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_same_curves(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in CURVE_KEYS:
            if ref.get(key) is None:
                assert row.get(key) is None, (row["step"], key)
            else:  # the sums of two shards and of one batch differ in the last bits
                assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (row["step"], key)


@pytest.fixture(scope="module")
def single(corpus_file, tmp_path_factory) -> dict:
    """The one-process curves the multi-process runs must reproduce (run here, in this process)."""
    root = tmp_path_factory.mktemp("single")
    arms = {"vanilla": ["frac=1.0"], "sift": ["frac=0.5", GLOBAL], "sift-window": ["frac=0.5", GLOBAL, *WINDOW]}
    for name, extra in arms.items():
        run(make_config(tiny_overrides(corpus_file, NO_DROPOUT, *extra)), root / name)
    return {name: read_metrics(root / name) for name in arms}


def test_vanilla_on_two_processes_matches_one_and_rank_0_alone_writes_the_record(corpus_file, tmp_path, single):
    out = torchrun(*tiny_overrides(corpus_file, NO_DROPOUT, "frac=1.0"), f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 3, 6]  # every evaluation once
    assert_same_curves(rows, single["vanilla"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["samples_seen"] == 48
    assert summary["final_val_acc"] == rows[-1]["val_acc"]
    # one folder, one record, one set of checkpoints; rank 1 leaves its log and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".hydra", "checkpoints", "hf", "metrics.jsonl", "rank1.log", "run.json", "sift-train.log", "summary.json"]
    assert out.stdout.count("samples back-propagated") == 1  # one summary line
    assert out.stdout.count(" | val_loss ") == 3  # a line per evaluation, from rank 0 alone


def test_sift_with_global_selection_on_two_processes_matches_one(corpus_file, tmp_path, single):
    out = torchrun(*tiny_overrides(corpus_file, NO_DROPOUT, "frac=0.5", GLOBAL), f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert rows[1]["score_kept"] > rows[1]["score_dropped"]  # scores were gathered from both ranks
    assert_same_curves(rows, single["sift"])


def test_micro_batches_on_two_processes_match_one_process(corpus_file, tmp_path, single):
    """trainer.accumulate=2 under DDP (the first micro-batch under no_sync): the one-process, one-batch curve."""
    out = torchrun(*tiny_overrides(corpus_file, NO_DROPOUT, "frac=0.5", GLOBAL, "trainer.accumulate=2"),
                   f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_curves(read_metrics(tmp_path), single["sift"])


def test_two_processes_select_on_the_steps_one_process_selects_on(corpus_file, tmp_path, single):
    out = torchrun(*tiny_overrides(corpus_file, NO_DROPOUT, "frac=0.5", GLOBAL, *WINDOW), f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["selected_steps"] for r in rows] == [0, 1, 2]
    assert_same_curves(rows, single["sift-window"])


def test_compiled_sift_on_two_processes_matches_one_eager(corpus_file, tmp_path, single):
    # torch.compile of the DDP-wrapped model (dynamo splits its graph at DDP's buckets) beside the gathers of
    # a global selection: what trainer.compile=auto does under torchrun on GPUs
    out = torchrun(*tiny_overrides(corpus_file, NO_DROPOUT, "frac=0.5", GLOBAL, "trainer.compile=true"),
                   f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.compile failed" not in out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compiled"] and summary["compile_time_s"] > 0
    assert_same_curves(read_metrics(tmp_path), single["sift"])


COUNTING = """
import atexit, json, os
from sift_cli.models.bert import BertMLM
from sift_cli.train import main

rows = {"loss": [], "exit_scores": []}
for name in rows:
    def counted(self, batch, *args, _call=getattr(BertMLM, name), _name=name, **kwargs):
        rows[_name].append(len(batch["input_ids"]))
        return _call(self, batch, *args, **kwargs)
    setattr(BertMLM, name, counted)
atexit.register(lambda: open(os.environ["ROWS_LOG"] + os.environ["RANK"], "w").write(json.dumps(rows)))
main()
"""


def test_local_selection_backpropagates_ceil_frac_of_each_share_on_every_rank(corpus_file, tmp_path, monkeypatch):
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    monkeypatch.setenv("ROWS_LOG", str(tmp_path / "rows"))
    out = torchrun(*tiny_overrides(corpus_file, "frac=0.3"), f"hydra.run.dir={tmp_path / 'run'}", script=script)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"rows{rank}").read_text())
        # 6 steps and the FLOP count before the clock: each rank scores its 4 rows and back-propagates
        # ceil(0.3 * 8 / 2) = 2 of them (one process would keep ceil(0.3 * 8) = 3 of 8)
        assert rows == {"loss": [2] * 7, "exit_scores": [4] * 7}, rank
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_backpropagated_per_step"] == 4 and summary["samples_backpropagated"] == 24
    assert summary["samples_scored_per_step"] == 8 and summary["world_size"] == 2
    assert "frac=0.3 over 2 processes back-propagates 2 x 2 of 8 rows a step, not 3 of 8" in out.stderr


TIMED = """
import atexit, json, os
from sift_cli.trainer import Training
from sift_cli.train import main

seen = {"lr": [], "evaluations": [], "checkpoints": []}

def logged(name, record):
    def wrapped(self, *args, _call=getattr(Training, name), **kwargs):
        out = _call(self, *args, **kwargs)
        seen[record].append([self.state.step, self.optimizer.param_groups[0]["lr"]] if record == "lr" else
                            self.state.step)
        return out
    setattr(Training, name, wrapped)

for name, record in (("set_lr", "lr"), ("evaluate", "evaluations"), ("checkpoint", "checkpoints")):
    logged(name, record)
atexit.register(lambda: open(os.environ["SEEN_LOG"] + os.environ["RANK"], "w").write(json.dumps(seen)))
main()
"""


def test_time_budgets_and_schedules_are_one_decision_for_every_rank(corpus_file, tmp_path, monkeypatch):
    """Evaluations, checkpoints and the learning rate by the training clock, while rank 0 alone does work off
    it (diagnostics every step): each rank's clock differs, but every decision is taken on one agreed time.
    Were it not, one rank would evaluate while the other trained (a hang), the replicas would step with
    different rates, and the waiting ranks' clocks would spend the budget on rank 0's diagnostics."""
    script = tmp_path / "timed.py"
    script.write_text(TIMED)
    monkeypatch.setenv("SEEN_LOG", str(tmp_path / "seen"))
    timed = ["trainer.max_steps=null", "trainer.max_time_s=4", "trainer.eval_every_steps=null",
             "trainer.eval_every_s=0.3", "trainer.checkpoint_every_s=0.7", "trainer.schedule_unit=time",
             "trainer.scheduler=linear", "trainer.warmup=0.5", "diagnostics.every_n_steps=1"]
    out = torchrun(*tiny_overrides(corpus_file, "frac=0.5", *timed), f"hydra.run.dir={tmp_path / 'run'}",
                   script=script, timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"seen{rank}").read_text()) for rank in (0, 1))
    assert rank0 == rank1  # the same rate at every step, the same evaluation and checkpoint steps
    assert len(rank0["evaluations"]) >= 5 and len(rank0["checkpoints"]) >= 3
    assert len({lr for _, lr in rank0["lr"]}) > 10  # the rate did change with the clock
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_time_s"] >= 4  # the whole budget trained: rank 0's diagnostics were no one's time


def test_a_run_checkpointed_by_one_process_resumes_on_two(corpus_file, tmp_path, single):
    overrides = tiny_overrides(corpus_file, NO_DROPOUT, "frac=0.5", GLOBAL)
    first = [o for o in overrides if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=3"]
    run(make_config(first), tmp_path)
    out = torchrun(*overrides, f"hydra.run.dir={tmp_path}")  # the same global batch, raised budget
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming sift-loss-k1-f0.5-s0 from step 3" in out.stdout + out.stderr
    # rank 1 took the weights and optimizer state from rank 0's checkpoint: the curve goes on as if unbroken
    assert_same_curves(read_metrics(tmp_path), single["sift"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["world_size"] == 2 and summary["steps"] == 6
    first, then = summary["accelerator"].split(", then ")  # kept apart from runs on one machine by sift-compare
    assert first.endswith(" x1") and then == first[:-1] + "2"


def test_resnet_ranks_report_and_save_one_model_whose_val_loss_is_the_reported_one(tmp_path):
    """Each rank's batches move its own batch-norm statistics: averaged before every evaluation and checkpoint,
    the val_loss summed over both ranks' shards is the saved model's, evaluated in one process."""
    args = ["model=resnet18", "data=digits", "data.image_size=8", "data.max_val_samples=32", "data.num_workers=0",
            "trainer.batch_size=8", "trainer.max_steps=3", "trainer.eval_every_steps=3", "trainer.max_time_s=null",
            "trainer.eval_every_s=null", "trainer.eval_batch_size=16", "trainer.warmup=0", "logger=none"]
    out = torchrun(*args, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = make_config(args)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, **data.model_args)
    model.load_state_dict(torch.load(max(tmp_path.glob("checkpoints/step-*")) / "model.pt"))
    cpu = torch.device("cpu")
    saved = evaluate(model, data.val_batches(16), autocast_for(cfg.trainer.precision, cpu), cpu)
    reported = json.loads((tmp_path / "summary.json").read_text())["final_val_loss"]
    assert reported == pytest.approx(saved["val_loss"], rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["frac=1.5"], "frac=1.5 is outside (0, 1]"),  # found before any process group work
    (["trainer.batch_size=7"], "trainer.batch_size=7 must be divisible by the 2 processes"),  # by every rank
    # an empty folder: only rank 0 reads it and finds no checkpoint
    (["trainer.resume=NOWHERE"], "trainer.resume=NOWHERE is not a valid checkpoint folder"),
    # one validation sequence: rank 1's shard is empty, and rank 0, which has one, stops too
    (["data.max_val_samples=1"], "the validation set has too few samples to give each of 2 processes one"),
])
def test_bad_input_under_torchrun_ends_every_rank_with_the_one_line(args, message, corpus_file, tmp_path):
    nowhere = str(tmp_path / "nowhere")
    os.mkdir(nowhere)
    args, message = [a.replace("NOWHERE", nowhere) for a in args], message.replace("NOWHERE", nowhere)
    assert_every_rank_ends_with(message, *tiny_overrides(corpus_file, *args), f"hydra.run.dir={tmp_path / 'run'}",
                                logs=tmp_path / "logs")


def assert_every_rank_ends_with(message: str, *args: str, logs: Path) -> None:
    # --redirects: each rank's own output in its own file. A monitor interval longer than the default
    # 0.1 s lets the slower rank finish its check before torchrun stops it for the faster one's exit
    # (5 s: on a loaded machine one rank can still be importing torch seconds after the other exits).
    out = torchrun(*args, launcher=["--redirects", "3", "--log-dir", str(logs), "--monitor-interval", "5"],
                   timeout=120)
    assert out.returncode != 0
    errors = sorted(logs.rglob("stderr.log"))
    assert len(errors) == 2
    for err in errors:
        lines = err.read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sift-train: error: ") and message in lines[0], lines
    assert f'File "{REPO / "sift_cli"}' not in out.stderr  # torchrun's report of the exit, never our traceback


def test_ranks_whose_tokenizers_differ_end_with_the_one_line(corpus_file, tmp_path):
    """As when each node trains its own tokenizer in a cache folder of its own: rank 1's numbers two tokens the
    other way round."""
    cache = tmp_path / "cache"
    built = instantiate(make_config(tiny_overrides(corpus_file, f"data.cache_dir={cache}1")).data)
    spec = json.loads((built.folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [token for token in vocab if not token.startswith("[")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (built.folder / "tokenizer.json").write_text(json.dumps(spec))
    assert_every_rank_ends_with(
        "the processes read different data: rank 1's", *tiny_overrides(corpus_file),
        f"data.cache_dir={cache}${{oc.env:LOCAL_RANK}}", f"hydra.run.dir={tmp_path / 'run'}", logs=tmp_path / "logs")


def test_submitit_local_sweep_runs_each_job_as_one_run_over_its_tasks(corpus_file, tmp_path):
    """The cluster path on one machine: each job's 2 tasks join one process group through submitit's job
    environment, as SLURM tasks do."""
    out = subprocess.run([sys.executable, "-m", "sift_cli.train", "--multirun", "hydra/launcher=submitit_local",
                          "hydra.launcher.tasks_per_node=2", *tiny_overrides(corpus_file, "frac=0.5,1.0"),
                          f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads((tmp_path / job / "summary.json").read_text()) for job in ("0", "1")]
    assert [(s["method"], s["world_size"], s["steps"]) for s in summaries] == [("sift-loss", 2, 6), ("vanilla", 2, 6)]
    for job in ("0", "1"):
        assert [r["step"] for r in read_metrics(tmp_path / job)] == [0, 3, 6]
    # one job at a time, as without a launcher, so that neither job's time includes the other's load
    assert "runs the sweep's 2 jobs one at a time" in out.stderr
    assert (tmp_path / "0" / "summary.json").stat().st_mtime <= (tmp_path / "1" / "run.json").stat().st_mtime


def test_slurm_launcher_config_renders_a_requeueing_multi_gpu_batch_script(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    from sift_cli.train import CONF

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    scripts = []

    def submit(self, fn, *args):  # what sbatch would be given, instead of calling it
        scripts.append(self._executor._make_submission_file_text("python -m submitit.core._submit", "x"))
        scripts.append(self._executor.max_num_timeout)
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", "hydra.launcher.partition=gpu"])
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)  # every key is one submitit accepts, or this raises
    launcher.config = cfg
    launcher.launch([["frac=0.5"]], 0)
    script, requeues = scripts
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --time=240",
                 "export SLURM_KILL_BAD_EXIT=1", "export OMP_NUM_THREADS=8"):
        assert line in script.splitlines(), line
    assert "\nsrun " in script and requeues == 20


def test_slurm_tasks_become_torchrun_ranks(monkeypatch):
    """`srun` in a batch script of the user's own (no submitit executor): SLURM's variables, node list included."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[011-012]"}
    monkeypatch.setattr(os, "environ", dict(slurm))
    distributed._from_slurm()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert env["MASTER_ADDR"] == "gpu011" and 20000 <= int(env["MASTER_PORT"]) <= 60000
    port = env["MASTER_PORT"]

    monkeypatch.setattr(os, "environ", {**slurm, "SLURM_PROCID": "0", "MASTER_ADDR": "head"})
    distributed._from_slurm()
    assert os.environ["MASTER_PORT"] == port  # every task of the job picks the same port
    assert os.environ["MASTER_ADDR"] == "head" and os.environ["RANK"] == "0"  # the user's own address wins

    torchrun_env = {**slurm, "RANK": "5", "WORLD_SIZE": "8"}  # torchrun inside an allocation: its ranks win
    monkeypatch.setattr(os, "environ", dict(torchrun_env))
    distributed._from_slurm()
    assert os.environ == torchrun_env

    monkeypatch.setattr(os, "environ", {**slurm, "SLURM_NTASKS": "1"})  # one task: one process, no group
    distributed._from_slurm()
    assert "RANK" not in os.environ

    monkeypatch.setattr(os, "environ", dict(slurm))
    monkeypatch.setitem(sys.modules, "submitit.slurm.slurm", None)  # the slurm extra not installed
    with pytest.raises(ConfigError, match=r"one of 4 SLURM tasks, .* pip install 'sift-train\[slurm\]'"):
        distributed._from_slurm()
