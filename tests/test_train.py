"""End-to-end runs on a tiny corpus: records, step accounting, selection, W&B, the CLI's errors."""

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import make_config, sift_train, tiny_overrides
from sift_cli.config import ConfigError
from sift_cli.data.text import TextData
from sift_cli.models.bert import BertMLM
from sift_cli.records import read_metrics
from sift_cli.train import add_overrides, check_flag_order, check_launcher, run, training_identity


def rows_of(run_dir):
    return read_metrics(Path(run_dir))


def test_sift_run_records_monotone_time_and_backpropagates_ceil_frac_b(corpus_file, tmp_path, monkeypatch):
    sizes, scored = [], []
    loss, exit_scores = BertMLM.loss, BertMLM.exit_scores
    monkeypatch.setattr(BertMLM, "loss", lambda self, b: (sizes.append(len(b["input_ids"])), loss(self, b))[1])
    monkeypatch.setattr(BertMLM, "exit_scores", lambda self, b, k, c: (scored.append((len(b["input_ids"]), k, c)),
                                                                      exit_scores(self, b, k, c))[1])
    cfg = make_config(tiny_overrides(corpus_file, "frac=0.3", "exit_layer=1"))
    summary = run(cfg, tmp_path)

    # every update saw exactly ceil(frac*B) rows, every step scored the whole batch at exit layer 1 (the
    # first of each, before the clock, counts the step's FLOPs)
    assert sizes == [math.ceil(0.3 * 8)] * 7
    assert scored == [(8, 1, "loss")] * 7
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [0, 3, 6]
    times = [r["train_time_s"] for r in rows]
    assert times[0] == 0 and all(a < b for a, b in zip(times, times[1:]))
    assert [r["samples_backpropagated"] for r in rows] == [0, 9, 18]
    assert [r["samples_seen"] for r in rows] == [0, 24, 48]
    for r in rows:
        assert 0 <= r["val_acc"] <= 1 and r["val_loss"] > 0
    # the rate of the last step before each evaluation, at step 0 the first step's: the warm-up (2 steps) at 0
    assert [r["lr"] for r in rows] == [0.0, 1e-3, 1e-3]
    assert rows[1]["score_kept"] >= rows[1]["score_dropped"]  # top-k keeps the highest scores
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["method"] == "sift-loss" and on_disk["run_name"] == "sift-loss-k1-f0.3-s0"
    assert on_disk["samples_backpropagated"] == 18 and on_disk["final_val_acc"] == rows[-1]["val_acc"]
    assert on_disk["train_time_s"] == pytest.approx(times[-1])
    assert on_disk["config"]["frac"] == 0.3 and summary["steps"] == 6
    assert on_disk["data_passes"] == pytest.approx(48 / instantiate(cfg.data).num_train)  # samples drawn / data


def test_vanilla_runs_no_scoring_pass(corpus_file, tmp_path, monkeypatch):
    def forbidden(*args):
        raise AssertionError("vanilla must not score")

    monkeypatch.setattr(BertMLM, "exit_scores", forbidden)
    summary = run(make_config(tiny_overrides(corpus_file, "frac=1.0")), tmp_path)
    assert summary["method"] == "vanilla" and summary["samples_backpropagated"] == summary["samples_seen"] == 48


def test_out_of_memory_is_one_line_naming_the_batch_sizes(corpus_file, tmp_path, monkeypatch):
    def too_large(*args):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.50 GiB "
            "is free. Including non-PyTorch memory, this process has 77.61 GiB memory in use. If reserved but ...")

    monkeypatch.setattr(BertMLM, "loss", too_large)
    with pytest.raises(ConfigError) as refused:
        run(make_config(tiny_overrides(corpus_file)), tmp_path)
    message = str(refused.value)
    assert message.endswith("ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                            "capacity of 79.11 GiB of which 1.50 GiB is free) with model=BertMLM, trainer.batch_size=8 "
                            "over 1 process(es) and trainer.eval_batch_size=16; lower them or add GPUs")
    assert "\n" not in message


def test_random_arm_keeps_the_same_count_without_scoring(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(BertMLM, "exit_scores", lambda *a: pytest.fail("random must not score"))
    summary = run(make_config(tiny_overrides(corpus_file, "criterion=random")), tmp_path)
    assert summary["method"] == "random" and summary["samples_backpropagated"] == 6 * 4


def test_updated_batch_mode_scores_b_over_frac_and_keeps_b(corpus_file, tmp_path):
    summary = run(make_config(tiny_overrides(corpus_file, "trainer.batch_mode=updated", "frac=0.5")), tmp_path)
    assert (summary["samples_scored_per_step"], summary["samples_backpropagated_per_step"]) == (16, 8)


def test_exact_arm_and_diagnostics(corpus_file, tmp_path):
    summary = run(make_config(tiny_overrides(corpus_file, "exit_layer=2", "diagnostics.every_n_steps=2")), tmp_path)
    assert summary["method"] == "exact"
    diag = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag] == [2, 4, 6]  # the last step's too
    run(make_config(tiny_overrides(corpus_file, "diagnostics.every_n_steps=4")), tmp_path / "uneven")
    # the last step's even where every_n_steps does not divide it: the curve ends where training did
    assert [json.loads(line)["step"] for line in (tmp_path / "uneven/diagnostics.jsonl").read_text().splitlines()] == \
        [4, 6]
    for d in diag:
        assert d["spearman_k2"] == pytest.approx(1.0) and d["overlap_k2"] == 1.0  # layer L is exact
        assert -1 <= d["spearman_k1"] <= 1 and 0 <= d["overlap_k1"] <= 1


def test_time_budget_stops_training(corpus_file, tmp_path):
    cfg = make_config(tiny_overrides(corpus_file, "trainer.max_steps=null", "trainer.max_time_s=2",
                                     "trainer.eval_every_steps=null", "trainer.eval_every_s=1"))
    summary = run(cfg, tmp_path)
    assert 2 <= summary["train_time_s"] < 5 and summary["steps"] > 1  # the last step may run past the budget
    assert len(rows_of(tmp_path)) >= 3  # step 0, at least one timed evaluation, the final one


def test_batches_are_made_on_the_clock_but_the_one_preparing_the_step_needs(corpus_file, tmp_path, monkeypatch):
    """A data-bound run: every batch takes DELAY to make, two workers make them. Only the first step's batch
    (counting the step's FLOPs needs one) may be made before the clock starts, so the 11 others take at least
    11 x DELAY / 2 of training time; workers released before the clock would make several of them for free."""
    delay, steps, workers = 0.3, 12, 2
    make = TextData.train_batch

    def slowly(self, *args, **kwargs):
        time.sleep(delay)
        return make(self, *args, **kwargs)

    monkeypatch.setattr(TextData, "train_batch", slowly)  # in the forked workers too
    done = run(make_config(tiny_overrides(corpus_file, f"trainer.max_steps={steps}", "trainer.eval_every_steps=6",
                                          f"data.num_workers={workers}")), tmp_path)
    assert done["steps"] == steps and done["train_time_s"] >= (steps - 1) * delay / workers


def test_same_seed_same_result_and_validation_is_masked_identically(corpus_file, tmp_path):
    a = run(make_config(tiny_overrides(corpus_file)), tmp_path / "a")
    b = run(make_config(tiny_overrides(corpus_file, "trainer.deterministic=true")), tmp_path / "b")
    assert torch.are_deterministic_algorithms_enabled()
    c = run(make_config(tiny_overrides(corpus_file, "seed=1")), tmp_path / "c")
    assert not torch.are_deterministic_algorithms_enabled()  # a sweep's next job in this process is not held to it
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-4)
    assert c["final_val_loss"] != pytest.approx(a["final_val_loss"], rel=1e-6)
    # step 0 is the same untrained model only within a seed, but the masked validation tokens are shared
    first = [rows_of(tmp_path / d)[0] for d in "ab"]
    assert first[0]["val_loss"] == first[1]["val_loss"]


def test_pretrained_checkpoint_from_a_local_folder(corpus_file, tmp_path):
    from sift_cli.data.text import text_file_corpus, train_wordpiece

    tokenizer = train_wordpiece(text_file_corpus([str(corpus_file)]), 200, tmp_path / "tok.json")
    torch.manual_seed(0)
    source = BertMLM(vocab_size=len(tokenizer), num_layers=2, hidden_size=32, num_heads=2)
    ckpt = tmp_path / "ckpt"
    source.mlm.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)

    loaded = BertMLM(vocab_size=1, pretrained=str(ckpt))  # the checkpoint's vocabulary wins
    assert loaded.depth == 2
    assert torch.equal(loaded.mlm.bert.embeddings.word_embeddings.weight,
                       source.mlm.bert.embeddings.word_embeddings.weight)
    summary = run(make_config(tiny_overrides(corpus_file, f"model.pretrained={ckpt}")), tmp_path / "run")
    assert summary["depth"] == 2 and summary["steps"] == 6

    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(ConfigError, match=f"model.pretrained={ckpt} could not be loaded as a BERT checkpoint"):
        BertMLM(vocab_size=1, pretrained=str(ckpt))


def test_offline_wandb_run_holds_the_logged_keys(corpus_file, tmp_path, offline_env):
    overrides = [o for o in tiny_overrides(corpus_file) if o != "logger=none"]
    run(make_config(overrides + ["logger=wandb", f"logger.dir={tmp_path / 'wb'}", "targets=[0.01]"]),
        tmp_path / "run")
    [log] = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.time() + 120  # W&B's service process writes the log file after finish() returns, later when loaded
    while b"best_val_acc" not in log.read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    raw = log.read_bytes()
    for key in (b"val_acc", b"val_loss", b"train_time_s", b"samples_backpropagated", b"train_loss",
                b"sift-loss-k1-f0.5-s0", b"time_to_target/0.01", b"best_val_acc"):
        assert key in raw, key


def test_wandb_failure_warns_and_keeps_the_local_record(corpus_file, tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken)
    overrides = [o for o in tiny_overrides(corpus_file) if o != "logger=none"]
    with pytest.warns(UserWarning, match="no wandb today"):
        run(make_config(overrides + ["logger=wandb"]), tmp_path)
    assert len(rows_of(tmp_path)) == 3 and (tmp_path / "summary.json").exists()


# --- the CLI as users type it ------------------------------------------------------------------


def test_cli_multirun_sweep_writes_one_run_folder_per_job(corpus_file, tmp_path):
    out = sift_train("--multirun", "frac=0.5,1.0", "criterion=loss,entropy", *tiny_overrides(corpus_file),
                     f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    # vanilla once: frac=1.0 trains alike whatever the criterion, so job 3 (entropy) would repeat job 2 (loss)
    assert sorted(s["method"] for s in summaries) == ["sift-entropy", "sift-loss", "vanilla"]
    assert out.stdout.count("samples back-propagated") == 3  # one summary line per run
    assert "1 of the sweep's 4 jobs would train an earlier job's run again and are skipped: job 3 (frac=1.0 " \
           "criterion=entropy" in out.stderr
    assert "sift-train: skipping job 3 (frac=1.0 criterion=entropy" in out.stdout and not (tmp_path / "3").exists()
    for job in sorted(p.parent for p in tmp_path.glob("*/summary.json")):
        # no terminal and no progress bar: the job's log says how it goes, a line per evaluation
        logged = [line.split("] - ", 1)[1] for line in (job / "sift-train.log").read_text().splitlines()
                  if "| val_acc" in line]
        rows = rows_of(job)
        assert [line.split(" | ")[:4] for line in logged] == [
            [f"step {r['step']}", f"train {r['train_time_s']:.1f} s", f"val_acc {r['val_acc']:.4f}",
             f"val_loss {r['val_loss']:.4f}"] for r in rows]
        assert all(line.split(" | ")[5].endswith(" TFLOP/s") for line in logged[1:])  # a CPU: no known peak
        assert logged[0].endswith("samples/s") and logged[-1].split(" | ")[4] == \
            f"{rows[-1]['samples_seen'] / rows[-1]['train_time_s']:.0f} samples/s"


DIGITS = ("model=resnet18", "data=digits", "data.image_size=8", "data.max_val_samples=32", "trainer.batch_size=8",
          "trainer.max_time_s=null", "trainer.eval_every_s=null", "trainer.warmup=0", "logger=none")


# each start method and each data family once: the pairs cost 15-30 s apiece, and the other two add no path
@pytest.mark.parametrize("method,data", [("spawn", "text"), ("forkserver", "images")])
def test_data_workers_started_by_spawn_or_forkserver_train(method, data, corpus_file, tmp_path):
    """Workers that are not forks receive the data pickled (the token file as its path, opened there) and the
    gate that holds them off the clock, made by the start method they are started with."""
    args = tiny_overrides(corpus_file) if data == "text" else DIGITS
    out = sift_train(*args, "data.num_workers=1", "trainer.max_steps=3", "trainer.eval_every_steps=3",
                     f"hydra.run.dir={tmp_path}", start_method=method)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_the_joblib_launcher_runs_a_sweep_with_data_workers(corpus_file, tmp_path):
    """Hydra's joblib launcher runs jobs in loky processes, whose default start method is loky's own: its
    pickler cannot send multiprocessing's shared memory (the gate) to a DataLoader worker."""
    out = sift_train("--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "frac=0.5,1.0",
                     *tiny_overrides(corpus_file), "data.num_workers=1", "trainer.max_steps=3",
                     "trainer.eval_every_steps=3", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert [(s["method"], s["status"], s["steps"]) for s in summaries] == [("sift-loss", "completed", 3),
                                                                           ("vanilla", "completed", 3)]


def test_cli_help_and_cfg_show_groups_and_the_composed_config():
    help_text = sift_train("--help").stdout
    for group in ("model", "data", "trainer", "logger", "experiment", "debug"):
        assert f"{group}:" in help_text
    assert "hydra/launcher=slurm" in help_text  # a group of Hydra's own, which Hydra's list leaves out
    job = sift_train("--cfg", "job", "model=bert", "frac=0.25").stdout
    assert "num_layers: 12" in job and "frac: 0.25" in job


def test_cli_warnings_of_our_own_are_one_line(corpus_file, tmp_path):
    out = sift_train(*tiny_overrides(corpus_file), "trainer.max_steps=1", "trainer.precision=fp16",
                     "trainer.batch_size=1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    lines = {line for line in out.stderr.splitlines() if "warning" in line}
    assert lines == {"sift-train: warning: trainer.precision=fp16 on a CPU: most CPUs have no fast fp16 arithmetic, "
                     "so this trains several times slower than fp32; fp16 is meant for GPUs without bf16",
                     "sift-train: warning: frac=0.5 keeps all 1 rows of a batch of 1 per process "
                     "(trainer.batch_size=1): this arm updates on every row as vanilla does, after a selection "
                     "that drops none; raise trainer.batch_size"}, out.stderr


@pytest.mark.parametrize("args,message", [
    (["model=gpt3"], "model=gpt3 is not a known model"),
    (["criterion=margin"], "criterion=margin is not allowed"),
    (["frac=1.5"], "frac=1.5 is outside (0, 1]"),
    (["exit_layer=3"], "exit_layer=3 is beyond bert_tiny, which has 2 blocks; choose 1..2"),
    (["trainer.max_time_s=-5"], "trainer.max_time_s=-5.0 must be positive"),
    (["data.paths=[/no/such/file.txt]"], "data.paths contains /no/such/file.txt, which is not a file"),
    (["data.paths=[EMPTY]"], "which holds no text"),
    (["model.pretrained=CORRUPT"], "could not be loaded as a tokenizer"),
    # the model's own refusals, as it is built: ours, and a ValueError of the library it builds on
    (["model.num_layers=0"], "model.num_layers=0 must be at least 1"),
    (["model.num_heads=3"], "model (sift_cli.models.bert.BertMLM) refuses its settings: The hidden size (128) is "
                            "not a multiple of the number of attention heads (3)"),
])
def test_cli_bad_input_is_one_line_exit_2_no_traceback(args, message, corpus_file, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{ not json")
    base = [a for a in tiny_overrides(corpus_file) if not a.startswith("data.paths")]
    args = [a.replace("EMPTY", str(tmp_path / "empty.txt")).replace("CORRUPT", str(tmp_path / "corrupt"))
            for a in args]
    out = sift_train(*base, f"data.paths=[{corpus_file}]", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()  # refused before or after Hydra made it: no folder left behind


@pytest.mark.parametrize("args,message", [
    (["targets=0.5"], "targets=0.5 is not a list; write targets=[0.5]"),
    (["seed=-1"], "seed=-1 must be 0 or more"),
    (["frac=0.5", "--multirun", "seed=1"], "--multirun must come before the overrides; run: sift-train --multirun "
                                           "frac=0.5 seed=1"),
    # a login node: the launcher would be ignored and the run would train here
    (["hydra/launcher=slurm"], "hydra/launcher=slurm works only under --multirun (without it Hydra trains here"),
    (["--multirun", "hydra/launcher=slurm"], "hydra/launcher=slurm needs SLURM, but sbatch and srun are not on this "
                                             "machine's PATH; run the command on the cluster's login node, or use "
                                             "hydra/launcher=submitit_local"),
])
def test_cli_traps_of_the_command_line_are_one_line(args, message, corpus_file, tmp_path):
    bare = tmp_path / "bin"  # a PATH without SLURM, whatever machine runs the test
    bare.mkdir()
    out = sift_train(*args, *tiny_overrides(corpus_file), f"hydra.run.dir={tmp_path / 'run'}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", PATH=str(bare))
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_jobs_that_train_the_same_run_are_told_apart_from_those_that_do_not():
    def identity(*overrides):
        return training_identity(make_config(["frac=1.0", *overrides]))

    vanilla = identity("criterion=loss")
    assert identity("criterion=entropy") == identity("exit_layer=2", "trainer.batch_mode=updated") == vanilla
    assert identity("selection.start=0.5", "selection.every=2") == vanilla  # vanilla never selects
    assert identity("seed=1") != vanilla and identity("trainer.optimizer.lr=0.01") != vanilla
    sift = [training_identity(make_config(["frac=0.5", f"criterion={c}"])) for c in ("loss", "entropy")]
    assert sift[0] != sift[1]  # below frac=1.0 the criterion chooses the samples


def test_submitit_local_runs_a_sweep_one_job_at_a_time_unless_told():
    local = ["hydra/launcher=submitit_local", "frac=0.5,1.0"]
    assert check_launcher(local, multirun=True, jobs=2) == ["hydra.sweeper.max_batch_size=1"]
    assert check_launcher(local, multirun=True, jobs=1) == []  # nothing to run beside
    assert check_launcher(["frac=0.5,1.0"], multirun=True, jobs=2) == []  # Hydra's own launcher: one at a time
    with pytest.warns(UserWarning, match="max_batch_size=2 with hydra/launcher=submitit_local runs 2 jobs of the sweep "
                                         "at once on this machine: they share its cores"):
        assert check_launcher(local + ["hydra.sweeper.max_batch_size=2"], multirun=True, jobs=4) == []


def test_multirun_may_end_the_overrides_but_not_split_them():
    check_flag_order(["frac=0.5,1.0", "seed=1", "--multirun"])  # Hydra reads this: no refusal
    check_flag_order(["-m", "frac=0.5,1.0"])
    with pytest.raises(ConfigError, match="-m must come before the overrides; run: sift-train --multirun frac=0.5 s"):
        check_flag_order(["frac=0.5", "-m", "seed=1,2"])
    argv = ["sift-train", "frac=0.5,1.0", "--multirun"]
    add_overrides(argv, ["hydra.sweeper.max_batch_size=1"])  # with the others, so that Hydra still reads them all
    assert argv == ["sift-train", "frac=0.5,1.0", "hydra.sweeper.max_batch_size=1", "--multirun"]
    argv = ["sift-train", "--multirun", "frac=0.5,1.0"]
    add_overrides(argv, ["x=1"])
    assert argv == ["sift-train", "--multirun", "frac=0.5,1.0", "x=1"]


@pytest.mark.parametrize("args,what", [([], "run folder (hydra.run.dir)"),
                                       (["--multirun"], "sweep folder (hydra.sweep.dir)")])
def test_cli_an_unwritable_output_folder_is_one_line(args, what, corpus_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute stops it too
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        out = sift_train(*args, *tiny_overrides(corpus_file), f"hydra.run.dir={locked / 'run'}",
                         f"hydra.sweep.dir={locked / 'run'}")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"sift-train: error: the {what} {locked / 'run'} is not writable (permission " \
                                 f"denied); choose another folder or fix its permissions"
