"""When to select: the window (selection.start/end, fractions of the budget) and the interval (selection.every).
A step that does not select is vanilla's: no scoring pass, every drawn row (batch_mode=updated: B of them)."""

import functools
import json
import re
import warnings

import pytest
import torch

from conftest import make_config, tiny_overrides
from sift_cli.config import ConfigError, validate
from sift_cli.records import read_metrics
from sift_cli.train import precheck, run
from sift_cli.trainer import Selection

STEPS = ("trainer.max_steps=8", "trainer.eval_every_steps=2")


def window(start=0.0, end=1.0, every=1, frac=0.5) -> Selection:
    return Selection(frac, "loss", 8, 4, 0, "local", torch.device("cpu"), start=start, end=end, every=every)


def test_the_window_and_the_interval_decide_each_step():
    half = window(start=0.5)
    assert [half.selects(s / 8, s) for s in range(8)] == [False] * 4 + [True] * 4
    composer = window(start=0.5, end=0.9, every=2)  # Composer's defaults: 50-90% of training, every second step
    assert [s for s in range(10) if composer.selects(s / 10, s)] == [6, 8]
    assert [window(every=2).selects(None, s) for s in range(4)] == [True, False, True, False]  # no budget: no window
    assert not any(window(frac=1.0).selects(s / 8, s) for s in range(8))  # vanilla never selects
    assert window().kinds == (True,) and half.kinds == (True, False) and window(frac=1.0).kinds == (False,)


def test_a_half_window_selects_on_no_step_before_half_the_budget_and_on_every_step_after(corpus_file, tmp_path):
    summary = run(make_config(tiny_overrides(corpus_file, *STEPS, "frac=0.5", "selection.start=0.5")), tmp_path)
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["selected_steps"]) for r in rows] == [(0, 0), (2, 0), (4, 0), (6, 2), (8, 4)]
    # 4 vanilla steps of 8 rows, then 4 selecting steps keeping 4 of 8: the counts in summary.json match
    assert [r["samples_backpropagated"] for r in rows] == [0, 16, 32, 40, 48]
    assert (summary["selected_steps"], summary["samples_scored"], summary["samples_backpropagated"]) == (4, 32, 48)
    assert "score_kept" not in rows[2] and rows[4]["score_kept"] > rows[4]["score_dropped"]  # scored: in the window
    assert summary["selection"] == {"start": 0.5, "end": 1.0, "every": 1}
    assert summary["run_name"] == "sift-loss-k1-f0.5-w0.5-1-s0"


def test_every_second_step_alternates_and_updated_batches_back_propagate_b_rows_off_schedule(corpus_file, tmp_path):
    summary = run(make_config(tiny_overrides(corpus_file, *STEPS, "frac=0.5", "selection.every=2",
                                             "trainer.batch_mode=updated")), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["selected_steps"] for r in rows] == [0, 1, 2, 3, 4]
    # batch_mode=updated: 16 rows drawn every step, 8 back-propagated whether selected or not; 16 scored per selection
    assert (summary["samples_seen"], summary["samples_backpropagated"], summary["samples_scored"]) == (128, 64, 64)
    assert summary["run_name"] == "sift-loss-k1-f0.5-updated-every2-s0"


def test_both_kinds_of_step_compile_whole_and_train_as_the_eager_ones(corpus_file, tmp_path, monkeypatch):
    """The compiled step of either kind (eager backend, fullgraph=True: a graph break would fail the compile and
    fall back to eager with a warning) gives the eager run's curve."""
    overrides = tiny_overrides(corpus_file, *STEPS, "frac=0.5", "selection.every=2", "model.dropout=0")
    eager = run(make_config(overrides), tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager", fullgraph=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed ... training eagerly"
        compiled = run(make_config([*overrides, "trainer.compile=true"]), tmp_path / "compiled")
    assert compiled["compiled"] and compiled["selected_steps"] == eager["selected_steps"] == 4
    curves = [[(r["val_loss"], r["train_loss"] or 0.0) for r in read_metrics(tmp_path / run_dir)]
              for run_dir in ("eager", "compiled")]
    assert curves[1] == [pytest.approx(point, rel=1e-5) for point in curves[0]]


def test_composer_runs_in_the_harness_as_its_users_run_it(corpus_file, tmp_path):
    cfg = make_config(tiny_overrides(corpus_file, *STEPS, "arm=composer"))
    summary = run(cfg, tmp_path)
    # exit_layer=depth: bert_tiny's 2 blocks, the full model's loss
    assert (summary["method"], summary["exit_layer"], summary["criterion"]) == ("loss_proportional", 2,
                                                                                 "loss_proportional")
    assert summary["selection"] == {"start": 0.5, "end": 0.9, "every": 2}
    assert summary["selected_steps"] == 2  # steps 4 and 6 of 8: inside [4, 7.2), even


@pytest.mark.parametrize("override,message", [
    ("selection.start=0.6 selection.end=0.4", "selection.start=0.6 is not below selection.end=0.4"),
    ("selection.every=0", "selection.every=0 is not allowed"),
    ("selection.start=-0.1", "selection.start=-0.1 is outside [0, 1]"),
    ("selection.end=1.5", "selection.end=1.5 is outside [0, 1]"),
    ("selection.start=0.5 trainer.schedule_unit=steps trainer.max_steps=null",
     "selection.start=0.5 and selection.end=1.0 are fractions of trainer.max_steps (trainer.schedule_unit=steps), "
     "which is null"),
    ("exit_layer=last", "exit_layer=last is not allowed; give a block number"),
    ("selection.strat=0.5", "selection.strat is not a known key; did you mean selection.start?"),
])
def test_a_bad_schedule_is_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        if "strat" in override:
            precheck([override])
        else:
            validate(make_config(override.split()))


def test_a_resumed_run_may_not_move_the_budget_its_window_is_measured_on(corpus_file, tmp_path):
    overrides = tiny_overrides(corpus_file, *STEPS, "frac=0.5", "selection.start=0.5")
    run(make_config(overrides), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.max_steps \(8 -> 12\).*selection\.start and selection\.end are "
                                          r"fractions of trainer\.max_steps"):
        run(make_config([*overrides, "trainer.max_steps=12"]), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
