"""benchmarks/calibration.py at a tiny size: the arm table, the verdict rule, a run of two arms read back."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from conftest import make_config
from sift_cli.config import validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibration as c  # noqa: E402


def as_dict(overrides: list[str]) -> dict:
    return dict(o.split("=", 1) for o in overrides)


def test_every_arm_expands_to_valid_overrides_with_an_equal_sample_budget():
    model = c.MODELS["bert_tiny"]
    depth = c.depth_of(model)
    assert depth == 2 and c.depth_of(c.MODELS["resnet18"]) == 4
    settings = list(c.SETTINGS)
    for number, arm in enumerate(c.ARMS):  # every arm, and every setting with some arm (composing takes time)
        cfg = make_config(c.overrides(model, depth, settings[number % len(settings)], arm, seed=1))
        validate(cfg, {"model": "bert_tiny"})
        kept = math.ceil(cfg.frac * cfg.trainer.batch_size)
        assert cfg.trainer.max_steps * kept == model.samples  # every arm back-propagates the same samples
        assert cfg.trainer.eval_every_steps * kept == model.eval_every  # ... evaluated at the same counts
        assert cfg.seed == 1 and cfg.trainer.max_time_s is None and cfg.logger.backend == "none"
    exact, sift = (as_dict(c.overrides(model, depth, "d=0.5", a, 0)) for a in ("exact", "sift"))
    assert (exact["exit_layer"], exact["criterion"], sift["exit_layer"]) == ("2", "loss", "1")
    assert sift["data.duplicate_fraction"] == "0.5"
    noisy = as_dict(c.overrides(model, depth, "noise=0.3", "vanilla", 0))
    assert noisy["data.noise_fraction"] == "0.3" and noisy["trainer.max_steps"] == str(model.samples // 32)
    with pytest.raises(ValueError, match="multiples"):
        c.overrides(c.replace(model, eval_every=100), depth, "d=0", "vanilla", 0)


def test_verdict_needs_every_seed_and_one_seed_spread():
    ahead = c.gap([0.10, 0.11, 0.12], [0.08, 0.09, 0.10], sigma=0.01)
    assert ahead["wins"] == 3 and ahead["sigmas"] == pytest.approx(2.0) and c.observed(ahead)
    assert not c.observed(c.gap([0.10, 0.11, 0.09], [0.08, 0.09, 0.10], sigma=0.01))  # behind on one seed
    assert not c.observed(c.gap([0.10, 0.11, 0.12], [0.095, 0.105, 0.115], sigma=0.01))  # half a spread
    behind = c.gap([0.05, 0.06], [0.08, 0.09], sigma=0.01, sign=-1)  # noise: behind random is the known answer
    assert c.observed(behind) and not c.observed(c.gap([0.05, 0.06], [0.08, 0.09], sigma=0.01))
    assert not c.observed(c.gap([0.1], [0.0], sigma=None))  # one seed: no spread, no verdict
    assert c.pooled_std([[1.0, 3.0], [2.0, 2.0]]) == pytest.approx(1.0)


def test_tiny_plan_of_two_arms_writes_per_sample_and_per_second_rows(corpus_file, tmp_path):
    model = c.Model("bert_tiny", "tiny", "text_files",
                    (f"data.paths=[{corpus_file}]", "data.seq_len=32", "data.vocab_size=200", "data.val_fraction=0.2",
                     "data.num_workers=0", "trainer.eval_batch_size=16"),
                    batch_size=8, samples=64, eval_every=16, lr=2e-3)
    plan = c.Plan([model], ["d=0", "d=0.5"], ["random", "sift"], [0, 1], tmp_path / "runs")
    plan.run_all()
    folder = plan.folder(model, "d=0.5", "sift", 1)
    first = (folder / "summary.json").stat().st_mtime
    plan.run_all()  # resumable: completed runs are kept, not trained again
    assert (folder / "summary.json").stat().st_mtime == first
    assert not (folder / "checkpoints").exists()  # the report needs the records only

    table = c.read_table(plan, model, "d=0.5")
    assert table.samples == [16, 32, 64]
    for arm in ("random", "sift"):
        for per, xs in (("samples", table.samples), ("seconds", table.seconds)):
            for x in xs:
                values = table.at(arm, per, x)
                assert len(values) == 2 and all(0 <= v <= 1 for v in values)
        assert all(v > 0 for v in table.at(arm, "samples", 64, "val_loss"))
        assert [r["samples_backpropagated"] for r in table.rows[arm][0]] == [0, 16, 32, 48, 64]
    out = tmp_path / "calibration.md"
    text = c.report(plan, out, started=0.0)
    assert (tmp_path / "calibration-bert_tiny.png").stat().st_size > 0
    assert "| sift | " in text and "| random | " in text and "N = 64 samples" in text and "T = " in text
    verdicts = [line for line in text.splitlines() if line.startswith("- d=0.5, tiny: sift")]
    assert len(verdicts) == 1 and ("**observed**" in verdicts[0] or "**not observed**" in verdicts[0])
    assert any(line.startswith("- gap grows with d, tiny: sift") for line in text.splitlines())
    # --quick: one seed, a short budget; no verdict, rather than "not observed" for want of a spread
    quick = c.report(c.replace(plan, seeds=[0], quick=True), tmp_path / "quick.md", started=0.0)
    verdicts = [line for line in quick.splitlines() if line.startswith(("- d=0.5, tiny: sift", "- gap grows"))]
    assert len(verdicts) == 2 and all("**undetermined: quick mode checks the plumbing only**" in v for v in verdicts)
    assert "observed" not in "".join(verdicts)


def test_a_quick_report_leaves_the_tracked_reports_alone():
    import common

    assert common.report_path("calibration", True, None) == common.QUICK_RESULTS / "calibration-quick.md"
    assert not common.QUICK_RESULTS.is_relative_to(common.RESULTS)
    assert common.report_path("calibration", False, None) == common.RESULTS / "calibration.md"
    assert common.report_path("calibration", True, Path("mine.md")) == Path("mine.md")
