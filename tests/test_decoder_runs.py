"""Decoders through the whole app: the CLI offline, every criterion and batch mode, kill and resume, two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import make_config, sift_train, tiny_overrides
from sift_cli.config import CRITERIA, ConfigError
from sift_cli.records import DIAGNOSTICS, read_metrics
from sift_cli.train import run
from test_distributed import GLOBAL, assert_same_curves, torchrun
from test_resume import SCHEDULE, assert_same_run, interrupt_and_resume, train


def decoder(corpus_file: Path, *extra: str) -> list[str]:
    """A seconds-long gpt2_tiny run on causal windows of the test corpus."""
    return [o if o != "data=text_files" else "data=text_files_causal"
            for o in tiny_overrides(corpus_file, "model=gpt2_tiny", *extra)]


def test_the_issue_command_runs_offline_on_the_default_data(tmp_path):
    """`sift-train model=gpt2_tiny exit_layer=1 frac=0.5` as on a fresh clone: the model picks causal data
    (capped here to a few hundred docstrings and two steps, to keep the test short)."""
    out = sift_train("model=gpt2_tiny", "exit_layer=1", "frac=0.5", "trainer.max_steps=2", "trainer.max_time_s=null",
                     "data.max_documents=300", "logger=none", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["task"], summary["model"], summary["method"]) == ("causal", "gpt2_tiny", "sift-loss")
    assert summary["samples_backpropagated"] == summary["samples_seen"] // 2
    assert 0 <= summary["final_val_acc"] <= 1


def test_every_criterion_and_batch_mode_runs_and_validation_is_next_token_accuracy(corpus_file, tmp_path):
    arms = [(c, "scored") for c in CRITERIA] + [("loss", "updated"), ("diverse", "updated")]
    for criterion, mode in arms:
        folder = tmp_path / f"{criterion}-{mode}"
        run(make_config(decoder(corpus_file, f"criterion={criterion}", f"trainer.batch_mode={mode}",
                                "trainer.max_steps=2")), folder)
        rows = read_metrics(folder)
        assert [r["step"] for r in rows] == [0, 2], (criterion, mode)
        assert all(0 <= r["val_acc"] <= 1 and math.isfinite(r["val_loss"]) for r in rows)
        kept = json.loads((folder / "summary.json").read_text())["samples_backpropagated"]
        assert kept == (16 if mode == "updated" else 8), (criterion, mode)  # 2 steps of 8 rows, frac 0.5


def test_tuned_exits_and_a_llama_train_through_the_app_with_per_exit_diagnostics(corpus_file, tmp_path):
    for model, extra in (("llama_tiny", ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128"]),
                         ("gpt2_tiny", ["model.exit_head=tuned", "model.score_positions=8"])):
        run(make_config(decoder(corpus_file, f"model={model}", *extra, "trainer.max_steps=3",
                                "diagnostics.every_n_steps=3")), tmp_path / model)
        assert json.loads((tmp_path / model / "summary.json").read_text())["steps"] == 3
        [row] = read_metrics(tmp_path / model, DIAGNOSTICS)
        assert row["spearman_k2"] == pytest.approx(1.0) and -1 <= row["spearman_k1"] <= 1  # exit 2: the exact loss


def test_a_pretrained_folder_with_its_tokenizer_trains(corpus_file, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from test_causal_data import gpt2_style_tokenizer

    folder = gpt2_style_tokenizer(tmp_path / "neox")
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    cfg = make_config(decoder(corpus_file, "model=causal_lm", f"model.pretrained={folder}", "trainer.max_steps=2"))
    assert cfg.data.tokenizer == str(folder)
    summary = run(cfg, tmp_path / "run")
    assert summary["depth"] == 2 and summary["steps"] == 2


@pytest.mark.parametrize("extra,message", [
    (("exit_layer=3",), "exit_layer=3 is beyond gpt2_tiny, which has 2 blocks; choose 1..2"),
    (("model.score_positions=40",), "model.score_positions=40 is more than the 32 positions of a sequence"),
    (("data=text_files",), "model=gpt2_tiny trains on causal data but data=text_files is mlm data"),
])
def test_bad_values_are_one_line(corpus_file, tmp_path, extra, message):
    args = decoder(corpus_file, *extra)
    if extra == ("data=text_files",):
        args = [a if a != "data=text_files_causal" else "data=text_files" for a in args]
    out = sift_train(*args, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and out.stderr.startswith("sift-train: error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_folder_that_is_not_a_causal_lm_is_one_line(corpus_file, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(ConfigError, match="could not be loaded as a"):
        run(make_config(decoder(corpus_file, "model=causal_lm", f"model.pretrained={tmp_path / 'model'}")),
            tmp_path / "run")


def test_a_killed_decoder_run_resumes_bit_identical(corpus_file, tmp_path):
    args = decoder(corpus_file, *SCHEDULE, "frac=0.5")
    done = train(tmp_path / "reference", args)
    assert done.returncode == 0, done.stderr[-3000:]
    interrupt_and_resume(tmp_path / "resumed", args, ["step:3"])
    assert_same_run(tmp_path / "reference", tmp_path / "resumed")


def test_global_selection_on_two_processes_selects_as_one(corpus_file, tmp_path):
    args = decoder(corpus_file, "frac=0.5", GLOBAL)
    run(make_config(args), tmp_path / "single")
    out = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path / "two")
    assert rows[1]["score_kept"] > rows[1]["score_dropped"]
    assert_same_curves(rows, read_metrics(tmp_path / "single"))
