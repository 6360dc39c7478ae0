"""Runs that survive kills and preemption: killed at each fragile moment, resumed, bit-identical to a run never stopped.

Each interrupted run goes through the real CLI in a subprocess that ends itself where the test asks
(sift_cli/faults.py: SIGKILL at a kill point, or a signal to its whole process group after a step),
then the same command again; its last checkpoint and its metrics rows are compared with an
uninterrupted run's, tensor for tensor and value for value, wall-clock fields aside.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CORPUS, make_config, sift_train, tiny_overrides
from sift_cli.checkpoint import changed_keys, load_tensors, verify
from sift_cli.compare import load_runs
from sift_cli.config import ConfigError
from sift_cli.records import DIAGNOSTICS, METRICS, Recorder, read_metrics
from sift_cli.train import STAMP, run, run_stamp

SCHEDULE = ("trainer.max_steps=6", "trainer.eval_every_steps=2", "trainer.checkpoint_every_steps=2")
ARMS = {"sift": ("frac=0.5",), "random": ("criterion=random",), "vanilla": ("frac=1.0",),
        "fp16": ("frac=0.5", "trainer.precision=fp16"),
        # a rate that changes at every step, and a diagnostics row at every evaluation
        "sift-decay": ("frac=0.5", "trainer.scheduler=linear", "diagnostics.every_n_steps=2"),
        # vanilla steps 0-2, selecting steps 3-5 (selection.start=0.5 of 6 steps)
        "sift-window": ("frac=0.5", "selection.start=0.5")}
RESNET = ("model=resnet18", "data=digits", "data.image_size=8", "data.max_val_samples=32", "data.num_workers=2",
          "trainer.batch_size=8", "trainer.max_time_s=null", "trainer.eval_every_s=null", "trainer.eval_batch_size=16",
          "trainer.schedule_unit=steps", "trainer.warmup=2", "logger=none", *SCHEDULE)
VOLATILE = {"wall_time_s", "train_time_s", "data_time_s", "tflops", "mfu"}  # wall-clock: differ run to run


def overrides(arm: str, corpus_file: Path, *extra: str) -> list[str]:
    if arm == "resnet":
        return [*RESNET, *extra]
    return tiny_overrides(corpus_file, *SCHEDULE, *ARMS[arm], *extra)


def train(run_dir: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return sift_train(*args, f"hydra.run.dir={run_dir}", **env)


def sweep(sweep_dir: Path, corpus_file: Path, **env: str) -> subprocess.CompletedProcess:
    """SIFT (job 0) and vanilla (job 1) as one --multirun sweep."""
    return sift_train("--multirun", "frac=0.5,1.0", *tiny_overrides(corpus_file, *SCHEDULE), f"hydra.sweep.dir={sweep_dir}",
               **env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file):
    """The uninterrupted run of an arm, made once per module: SIFT and vanilla by one sweep."""
    root, made = tmp_path_factory.mktemp("reference"), {}

    def get(arm: str) -> Path:
        if arm not in made:
            if arm in ("sift", "vanilla"):
                out, folders = sweep(root / "sweep", corpus_file), {"sift": "sweep/0", "vanilla": "sweep/1"}
            else:
                out, folders = train(root / arm, overrides(arm, corpus_file)), {arm: arm}
            assert out.returncode == 0, out.stderr
            made.update({name: root / folder for name, folder in folders.items()})
        return made[arm]
    return get


def newest_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.glob("checkpoints/step-*"))


def comparable_rows(run_dir: Path, name: str = METRICS) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in read_metrics(run_dir, name)]


def assert_same_run(expected: Path, actual: Path) -> None:
    """The same final weights, optimizer state (and fp16's loss scale) to the bit, and the same metrics rows."""
    a, b = newest_checkpoint(expected), newest_checkpoint(actual)
    assert a.name == b.name
    names = sorted(p.name for p in a.glob("*.pt"))
    assert names == sorted(p.name for p in b.glob("*.pt"))
    for name in names:
        torch.testing.assert_close(torch.load(b / name), torch.load(a / name), rtol=0, atol=0)
    assert comparable_rows(actual) == comparable_rows(expected)
    if (expected / DIAGNOSTICS).exists():
        assert comparable_rows(actual, DIAGNOSTICS) == comparable_rows(expected, DIAGNOSTICS)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def leftovers(run_dir: Path) -> list[Path]:
    return list(run_dir.glob("checkpoints/.*-step-*"))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- killed (SIGKILL) or preempted (a signal to the whole process group), then resumed --------------


def left_behind(run_dir: Path, point: str, step: int) -> None:
    """What the interruption left in the folder, as the point promises."""
    if point == "checkpoint-files":  # the files written, no manifest: not a checkpoint
        [tmp] = leftovers(run_dir)
        assert (tmp / "model.pt").exists() and not (tmp / "manifest.json").exists()
    elif point == "checkpoint-rename":  # complete, but never renamed into place
        [tmp] = leftovers(run_dir)
        assert (tmp / "manifest.json").exists()
    elif point == "metrics-line":  # a torn last line, which readers leave out
        assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")
        assert read_metrics(run_dir)[-1]["step"] == step - 2
    if point.startswith("SIG"):  # preempted: a record and a checkpoint at the step the signal came after
        preempted = summary(run_dir)
        assert (preempted["status"], preempted["stop_signal"], preempted["steps"]) == \
            ("preempted", signal.Signals[point], step)
        assert newest_checkpoint(run_dir).name == f"step-{step:09d}"
        # no evaluation off the schedule, nor the one due at this step: the resumed run makes that one
        assert [r["step"] for r in read_metrics(run_dir)] == list(range(0, step, 2))
    else:
        assert not (run_dir / f"checkpoints/step-{step:09d}").exists()
        # killed: summary.json is the one written at the last evaluation, and sift-compare reads the run so far
        [killed] = load_runs([str(run_dir)], include_incomplete=True)
        assert killed.status == "running" and killed.summary["steps"] == killed.rows[-1]["step"]


def interrupt_and_resume(run_dir: Path, args: list[str], interruptions: list[str]) -> None:
    """Run `args` once per interruption, each ended there, then to the end. The summary counts the restarts
    and, as lost time, at least what the kills threw away (all of a process's, killed before its first
    checkpoint)."""
    thrown_away = 0.0
    for interruption in interruptions:
        point, step = interruption.split(":")
        if point.startswith("SIG"):
            out = train(run_dir, args, SIFT_TEST_SIGNAL=interruption)
            assert out.returncode == -signal.Signals[point], out.stderr  # ended by the signal: requeue me
        else:
            out = train(run_dir, args, SIFT_TEST_KILL=interruption)
            assert out.returncode == -signal.SIGKILL, out.stderr
            if not list(run_dir.glob("checkpoints/step-*")):
                thrown_away += json.loads((run_dir / "checkpoints/clock.json").read_text())["train_time_s"]
        left_behind(run_dir, point, int(step))
    out = train(run_dir, args)
    assert out.returncode == 0, out.stderr
    assert not leftovers(run_dir)  # a kill's temporary folder is cleaned
    done = summary(run_dir)
    assert done["status"] == "completed" and done["restarts"] == len(interruptions)
    assert done["lost_time_s"] >= thrown_away
    for clock in ("train_time_s", "wall_time_s"):  # the clocks go on across restarts, never back to 0
        times = [r[clock] for r in read_metrics(run_dir)]
        assert all(a < b for a, b in zip(times, times[1:])) and done[clock] >= times[-1]


@pytest.mark.parametrize("arm,interruptions", [
    ("random", ["checkpoint-rename:4"]),
    ("vanilla", ["step:2", "metrics-line:4"]),  # the first kill before any checkpoint: all its time is lost
    # batch norm and two DataLoader workers; the signal reaches the workers too, as SLURM sends it; then a kill
    ("resnet", ["SIGTERM:3", "step:5"]),
    ("fp16", ["step:5"]),  # the loss scale's state goes on: a fresh scaler would have counted 2 steps, not 6
    # the evaluation due at step 4 is made when the run resumes, as if never stopped (with the rate of step 4's
    # update, not the next one's); the diagnostics of step 4 are made before it stops
    ("sift-decay", ["SIGUSR1:4"]),
    ("sift", ["step:3", "step:3"]),  # the second process dies before a checkpoint: the first's toll still counts
    ("sift-window", ["step:3"]),  # resumed from step 2, before the window opens, into it
], ids=["random-killed-before-rename", "vanilla-killed-before-any-checkpoint-then-mid-metrics-line",
        "resnet-workers-preempted-then-killed", "fp16-killed-after-a-checkpoint",
        "sift-decaying-preempted-at-an-evaluation", "sift-killed-twice-between-two-checkpoints",
        "sift-window-killed-across-its-edge"])
def test_interrupted_and_resumed_run_is_bit_identical(arm, interruptions, reference, corpus_file, tmp_path):
    interrupt_and_resume(tmp_path, overrides(arm, corpus_file), interruptions)
    assert_same_run(reference(arm), tmp_path)


def test_corrupt_newest_checkpoint_warns_and_falls_back_to_the_one_before(reference, corpus_file, tmp_path):
    folder = copy_run(reference("sift"), tmp_path / "run")
    (folder / "summary.json").unlink()  # killed after its final checkpoint, before its summary
    newest = newest_checkpoint(folder)
    weights = newest / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as a full disk or a lost node leaves it

    out = train(folder, overrides("sift", corpus_file))
    assert out.returncode == 0, out.stderr
    assert f"checkpoint {newest} is not valid (model.pt does not match the manifest)" in out.stderr
    assert "resuming sift-loss-k1-f0.5-s0 from step 4" in out.stdout  # Hydra logs to stdout
    assert_same_run(reference("sift"), folder)


def test_a_kill_between_the_renames_of_a_replacing_checkpoint_resumes_from_its_step(reference, corpus_file,
                                                                                    tmp_path):
    # a second checkpoint at a step moves the first aside, then renames itself in: killed between the two, the
    # folder holds neither under its name. The one moved aside is put back before the newest is chosen
    folder = copy_run(reference("sift"), tmp_path / "run")
    (folder / "summary.json").unlink()
    newest = newest_checkpoint(folder)
    shutil.copytree(newest, newest.parent / f".tmp-{newest.name}-2")
    newest.rename(newest.parent / f".old-{newest.name}-1")
    out = train(folder, overrides("sift", corpus_file))
    assert out.returncode == 0, out.stderr
    assert "resuming sift-loss-k1-f0.5-s0 from step 6" in out.stdout
    assert not leftovers(folder)
    assert_same_run(reference("sift"), folder)


def test_a_failed_checkpoint_write_warns_and_training_goes_on(corpus_file, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if ".tmp-step-000000004-" in str(path):  # a full disk, as torch.save meets it: /dev/full fails every write
            return real_save(obj, "/dev/full", *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.warns(UserWarning, match=r"checkpoint at step 4 not written \(writing model.pt failed: "):
        done = run(make_config(overrides("sift", corpus_file)), tmp_path)
    assert done["status"] == "completed" and done["steps"] == 6
    assert sorted(p.name for p in tmp_path.glob("checkpoints/step-*")) == ["step-000000002", "step-000000006"]
    assert verify(tmp_path / "checkpoints/step-000000002")["train_state"]  # the previous one stayed intact
    assert not leftovers(tmp_path)


def test_a_checkpoint_no_process_can_read_is_one_line_naming_the_rank(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"could not be read by every process \(rank 0: .+\); resuming needs the "
                                          r"run folder on a file system that every process sees$"):
        load_tensors(tmp_path)


# --- the run folder: one run per folder, reruns resume, extend or skip ------------------------


def test_another_config_or_resume_never_is_refused_and_the_folder_kept(reference, corpus_file, tmp_path):
    folder = copy_run(reference("sift"), tmp_path / "run")
    before = (folder / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=re.escape(f"the run folder {folder} holds a run with another config: "
                                                    "frac (0.5 -> 0.3), seed (0 -> 1); rerun with its values")):
        # how the step is compiled is not named: a compiled step trains as the eager one
        run(make_config(overrides("sift", corpus_file, "frac=0.3", "seed=1", "trainer.compile=true",
                                  "trainer.compile_mode=max-autotune")), folder)
    with pytest.raises(ConfigError, match=f"the run folder {folder} already holds a run and trainer.resume=never"):
        run(make_config(overrides("sift", corpus_file, "trainer.resume=never")), folder)
    # the same config is the same run: completed, so nothing to do
    assert run(make_config(overrides("sift", corpus_file)), folder) == summary(folder)
    assert (folder / "metrics.jsonl").read_bytes() == before
    hydra_files = {p: p.read_bytes() for p in (folder / ".hydra").iterdir()}
    out = train(folder, overrides("sift", corpus_file, "frac=0.3"))  # refused before Hydra writes a thing
    assert out.returncode == 2 and "holds a run with another config: frac (0.5 -> 0.3)" in out.stderr
    assert {p: p.read_bytes() for p in (folder / ".hydra").iterdir()} == hydra_files


def test_a_run_saved_before_a_key_existed_resumes_when_the_key_holds_its_default(reference, corpus_file, tmp_path):
    """A newer version's option (here model.low_precision_layernorm) is absent from an older run's config: at the
    code's default, the behaviour from before the option (false), the run is the same one and extends; at the
    YAML's default (true) or anything else, it is another config."""
    folder = copy_run(reference("sift"), tmp_path / "run")
    saved = json.loads((folder / "run.json").read_text())
    del saved["config"]["model"]["low_precision_layernorm"]
    (folder / "run.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=re.escape("another config: model.low_precision_layernorm (None -> True)")):
        run(make_config(overrides("sift", corpus_file, "trainer.max_steps=8")), folder)
    done = run(make_config(overrides("sift", corpus_file, "trainer.max_steps=8", "model.low_precision_layernorm=false")),
               folder)
    assert done["status"] == "completed" and done["steps"] == 8 and done["restarts"] == 1


def test_raising_max_steps_extends_a_finished_run(reference, corpus_file, tmp_path):
    folder = copy_run(reference("sift"), tmp_path / "run")
    before = (folder / "metrics.jsonl").read_text().splitlines()
    done = run(make_config(overrides("sift", corpus_file, "trainer.max_steps=8")), folder)
    assert done["status"] == "completed" and done["steps"] == 8 and done["restarts"] == 1
    after = (folder / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before and [json.loads(r)["step"] for r in after[len(before):]] == [8]


def test_extending_onto_a_rewritten_corpus_is_refused_naming_both_fingerprints(tmp_path):
    """The rewritten corpus gets a token cache of its own: its ids would mean other word pieces."""
    corpus, folder = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(CORPUS)
    first = run(make_config(overrides("sift", corpus)), folder)
    records = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    corpus.write_text(CORPUS.replace("function", "method"))
    with pytest.raises(ConfigError) as refused:
        run(make_config(overrides("sift", corpus, "trainer.max_steps=8")), folder)
    found = re.fullmatch(rf"checkpoint {re.escape(str(newest_checkpoint(folder)))} was trained on data "
                         rf"{first['data_fingerprint']}, this run reads data ([0-9a-f]{{16}}): .*; resume it with its "
                         rf"own data, or train in a new folder", str(refused.value))
    assert found and found.group(1) != first["data_fingerprint"]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == records


def test_a_checkpoint_from_before_data_fingerprints_resumes_with_a_warning(reference, corpus_file, tmp_path):
    folder = copy_run(reference("sift"), tmp_path / "run")
    checkpoint = newest_checkpoint(folder)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state.pop("data_fingerprint") == summary(folder)["data_fingerprint"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["state.json"] = {"bytes": (checkpoint / "state.json").stat().st_size,
                              "sha256": hashlib.sha256((checkpoint / "state.json").read_bytes()).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {checkpoint} predates data fingerprints")):
        done = run(make_config(overrides("sift", corpus_file, "trainer.max_steps=8")), folder)
    assert done["status"] == "completed" and done["steps"] == 8 and done["restarts"] == 1


def test_extending_a_run_whose_checkpoints_were_removed_is_refused_and_its_records_kept(reference, corpus_file,
                                                                                        tmp_path):
    """Not trained again from step 0 over its records; a run killed before its first checkpoint (still running)
    starts over as before (test_interrupted_and_resumed_run_is_bit_identical, vanilla)."""
    folder = copy_run(reference("sift"), tmp_path / "run")
    shutil.rmtree(folder / "checkpoints")
    records = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=re.escape(f"the run folder {folder} holds a completed run but no "
                                                    f"checkpoint to continue it from")):
        run(make_config(overrides("sift", corpus_file, "trainer.max_steps=8")), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == records


def test_the_budget_a_decaying_schedule_runs_over_cannot_change_on_resume(reference, corpus_file, tmp_path, capsys):
    folder = copy_run(reference("sift"), tmp_path / "run")
    saved = json.loads((folder / "run.json").read_text())
    saved["config"]["trainer"].update(scheduler="linear", schedule_unit="steps")  # as if it had been run so
    (folder / "run.json").write_text(json.dumps(saved))
    linear = ("trainer.scheduler=linear", "trainer.schedule_unit=steps")
    with pytest.raises(ConfigError, match=re.escape(
            "another config: trainer.max_steps (6 -> 8) (trainer.scheduler=linear decays the learning rate over "
            "trainer.max_steps); rerun with its values")):  # its steps so far had the rates of a 6-step decay
        run(make_config(overrides("sift", corpus_file, *linear, "trainer.max_steps=8")), folder)
    assert run(make_config(overrides("sift", corpus_file, *linear)), folder) == summary(folder)
    assert "already completed" in (out := capsys.readouterr().out) and "raise trainer.max_steps" not in out
    assert "its learning rate decayed over trainer.max_steps: train longer in a new folder" in out

    def changed(*a: str, b: tuple[str, ...]) -> list[str]:
        config = [OmegaConf.to_container(make_config(overrides("sift", corpus_file, *x))) for x in (a, b)]
        return changed_keys(*config)

    over_time = ("trainer.scheduler=cosine", "trainer.schedule_unit=time", "trainer.max_time_s=60")
    assert changed(*over_time, b=(*over_time, "trainer.max_steps=8")) == []  # not the budget it decays over
    assert changed(*over_time, b=(*over_time[:2], "trainer.max_time_s=90")) == ["trainer.max_time_s"]


def test_resume_from_a_checkpoint_path_forks_into_a_new_folder(reference, corpus_file, tmp_path):
    source = reference("sift")
    before = (source / "metrics.jsonl").read_bytes()
    checkpoint = source / "checkpoints/step-000000004"
    done = run(make_config(overrides("sift", corpus_file, f"trainer.resume={checkpoint}")), tmp_path)
    assert done["status"] == "completed" and done["restarts"] == 1
    rows = (tmp_path / "metrics.jsonl").read_bytes()
    assert rows.startswith(before[:json.loads((checkpoint / "state.json").read_text())["positions"]["metrics.jsonl"]])
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2, 4, 6]
    assert (source / "metrics.jsonl").read_bytes() == before  # the source run is untouched


def test_a_rerun_sweep_skips_its_finished_jobs(reference, corpus_file):
    folders = [reference("sift"), reference("vanilla")]
    before = [(f / "metrics.jsonl").read_bytes() for f in folders]
    out = sweep(folders[0].parent, corpus_file)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("already completed") == 2
    assert [(f / "metrics.jsonl").read_bytes() for f in folders] == before


def test_ctrl_c_stops_the_sweep_after_recording_the_current_job(corpus_file, tmp_path):
    out = sweep(tmp_path, corpus_file, SIFT_TEST_SIGNAL="SIGINT:3")  # as a terminal sends it: to the group
    assert out.returncode == 130, out.stderr
    stopped = summary(tmp_path / "0")
    assert (stopped["status"], stopped["steps"]) == ("interrupted", 3)
    assert [r["step"] for r in read_metrics(tmp_path / "0")] == [0, 2, 3]  # Ctrl-C evaluates before it stops
    assert newest_checkpoint(tmp_path / "0").name == "step-000000003"
    assert not (tmp_path / "1").exists()  # the next job never started
    assert out.stderr.strip().splitlines()[-1] == ("sift-train: to train on from its checkpoint, rerun the same "
                                                   f"command with hydra.sweep.dir={tmp_path}")


def test_a_preemption_during_an_evaluation_stops_at_that_step(reference, tmp_path):
    # a SIGTERM to the whole group while the validation images' workers read: they leave it to the main
    # process, which finishes the evaluation, then checkpoints that step (not one step and a checkpoint later)
    out = train(tmp_path, overrides("resnet", Path()), SIFT_TEST_SIGNAL="SIGTERM:evaluation:2")
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert (summary(tmp_path)["status"], summary(tmp_path)["steps"]) == ("preempted", 2)
    assert [p.name for p in tmp_path.glob("checkpoints/step-*")] == ["step-000000002"]
    out = train(tmp_path, overrides("resnet", Path()))
    assert out.returncode == 0, out.stderr
    assert_same_run(reference("resnet"), tmp_path)


def test_ctrl_c_reaches_the_workers_too_and_the_evaluation_still_reads_through_them(tmp_path):
    # a terminal signals the whole group: the validation images' own workers must leave it to the main process,
    # which evaluates through them before it stops
    out = train(tmp_path, overrides("resnet", Path()), SIFT_TEST_SIGNAL="SIGINT:3")
    assert out.returncode == 130, out.stderr
    assert summary(tmp_path)["status"] == "interrupted"
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2, 3]


def test_ctrl_c_during_the_final_evaluation_stops_the_sweep(corpus_file, tmp_path):
    out = sweep(tmp_path, corpus_file, SIFT_TEST_SIGNAL="SIGINT:evaluation:6")  # job 0's budget is spent
    assert out.returncode == 130, out.stderr
    assert (summary(tmp_path / "0")["status"], summary(tmp_path / "0")["steps"]) == ("interrupted", 6)
    assert not (tmp_path / "1").exists()  # the next job never started


def test_ctrl_c_before_training_is_one_line_and_stops_the_sweep(corpus_file, tmp_path):
    out = sweep(tmp_path, corpus_file, SIFT_TEST_SIGNAL="SIGINT:data:0")  # while the data would be read
    assert out.returncode == 130
    assert out.stderr.strip().splitlines()[-1] == (f"sift-train: interrupted; {tmp_path / '0'} keeps what was "
                                                   "written before (a checkpoint only if training had reached one)")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "0" / "summary.json").exists() and not (tmp_path / "1").exists()


def test_ctrl_c_while_the_config_is_checked_is_one_line(corpus_file, tmp_path):
    out = train(tmp_path, overrides("sift", corpus_file), SIFT_TEST_SIGNAL="SIGINT:checks:0")
    assert out.returncode == 130 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["sift-train: interrupted before any run began; nothing was written"]



IMPORTING = """
import os, signal, sys
from importlib.metadata import entry_points

class CtrlC:  # pressed as Python begins to import torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
(script,) = entry_points(group="console_scripts", name="sift-train")  # what the installed command runs
script.load()()
"""


def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", IMPORTING, "model=bert_tiny"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 130 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["sift-train: interrupted before any run began; nothing was written"]
    assert list(tmp_path.iterdir()) == []


SWALLOWED = """
import os, signal, sys, time
import sift_cli.train as train

real_build = train.build
where = sys.argv.pop(1)  # before Hydra reads the overrides

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)

class Finalized:
    def __del__(self):  # Python reports the KeyboardInterrupt raised here, with its traceback, and goes on
        ctrl_c()

def build_after_a_swallowed_ctrl_c(*args, **kwargs):
    if where == "finalizer":
        Finalized()
    else:
        try:  # a library's broad except
            ctrl_c()
        except KeyboardInterrupt:
            pass
    return real_build(*args, **kwargs)

train.build = build_after_a_swallowed_ctrl_c
train.main()
"""


@pytest.mark.parametrize("where", ["except", "finalizer"])
def test_a_ctrl_c_swallowed_before_training_still_stops_the_run(corpus_file, tmp_path, where):
    script = tmp_path / "swallowed.py"
    script.write_text(SWALLOWED)
    out = subprocess.run([sys.executable, str(script), where, *overrides("sift", corpus_file),
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    assert out.returncode == 130 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("sift-train: interrupted; ")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it never trained


def test_default_run_folder_names_do_not_collide(monkeypatch):
    names = set()
    monkeypatch.setenv(STAMP, "")  # monkeypatch notes it unset before: the stamps made here go with the test
    for _ in range(2):  # two processes started in the same second
        monkeypatch.delenv(STAMP)
        names.add(run_stamp("%Y-%m-%d/%H-%M-%S"))
    assert len(names) == 2
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]+", n) for n in names)


# --- W&B: the same run continued, each row once -------------------------------------------------


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline .wandb file: W&B's header, then LevelDB-log records of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    rows, pos, record = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record, pos = record + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            parsed = wandb_internal_pb2.Record.FromString(record)
            if parsed.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in parsed.history.item})
            record = b""
    return rows


def test_killed_sift_run_resumes_its_wandb_run_bit_identical_each_row_logged_once(reference, corpus_file, tmp_path):
    wandb_dir, run_dir = tmp_path / "wb", tmp_path / "run"
    args = [o for o in overrides("sift", corpus_file) if o != "logger=none"] + ["logger=wandb",
                                                                                 f"logger.dir={wandb_dir}"]
    interrupt_and_resume(run_dir, args, ["checkpoint-files:4"])  # killed with its step-4 row written
    assert_same_run(reference("sift"), run_dir)

    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    fragments = sorted(wandb_dir.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    # offline, W&B cannot resume: a folder per process with the run's one id (one, if both started in the
    # same second: the folder is named to the second, and the resumed process rewrites its file)
    assert 1 <= len(fragments) <= 2
    newest, deadline, local = fragments[-1], time.time() + 120, read_metrics(run_dir)
    history = wandb_history(newest)
    # W&B's service process writes the file after finish() returns, and later still on a loaded machine
    while ([h["_step"] for h in history] != [r["step"] for r in local] or b"best_val_acc" not in newest.read_bytes()) \
            and time.time() < deadline:
        time.sleep(0.5)
        history = wandb_history(newest)
    assert [h["_step"] for h in history] == [r["step"] for r in local] == [0, 2, 4, 6], (fragments, history)
    assert [h["val_loss"] for h in history] == [r["val_loss"] for r in local]


class FakeWandbRun:
    def __init__(self, starting_step: int):
        self.starting_step, self.steps = starting_step, []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row: dict, step: int):
        assert step == row["step"]
        self.steps.append(step)


@pytest.mark.parametrize("starting_step,sent", [
    (0, [0, 2, 2, 4, 4, 6, 8]),  # new, or offline: the whole record, a step's diagnostics first
    (3, [4, 4, 6, 8]),  # W&B got steps 0-2 before the kill
    (7, [8]),  # W&B got step 6, which the checkpoint at step 4 does not hold: not sent twice
])
def test_recorder_sends_wandb_the_steps_it_lacks_once(starting_step, sent, tmp_path, monkeypatch):
    import wandb
    from omegaconf import OmegaConf

    def lines(*steps):
        return "".join(json.dumps({"step": s, "val_acc": s / 10}) + "\n" for s in steps)

    (tmp_path / "metrics.jsonl").write_text(lines(0, 2, 4) + lines(6) + lines(8)[:10])  # 6 and a torn 8: killed
    (tmp_path / "diagnostics.jsonl").write_text(lines(2, 4, 6))
    checkpoint = {"metrics.jsonl": len(lines(0, 2, 4)), "diagnostics.jsonl": len(lines(2, 4))}
    fake = FakeWandbRun(starting_step)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: fake)
    logger = OmegaConf.create({"backend": "wandb", "mode": "online", "project": "p", "entity": None, "dir": None})
    record = Recorder(tmp_path, logger, {}, name="n", group=None, job_type="sift-loss", tags=[], wandb_id="abc",
                      positions=checkpoint)
    assert [r["step"] for r in record.rows] == [0, 2, 4]
    record.log({"step": 6, "val_acc": 0.6})
    record.log({"step": 8, "val_acc": 0.8})
    assert fake.steps == sent
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2, 4, 6, 8]
    assert read_metrics(tmp_path, "diagnostics.jsonl") == [{"step": s, "val_acc": s / 10} for s in (2, 4)]
