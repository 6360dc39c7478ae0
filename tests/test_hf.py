"""SiftTrainer: a transformers Trainer that trains on the rows select() keeps, with the right loss normalisation."""

import json
import os
import subprocess
import sys

import pytest
import torch

from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, TrainingArguments

from conftest import REPO
from sift_cli import hf
from sift_cli.api import adapter
from sift_cli.config import CRITERIA
from sift_cli.hf import SiftTrainer
from sift_cli.models.bert import BertMLM
from sift_cli.models.decoder import CausalLM
from sift_cli.trainer import Selection, autocast_for, grad_scaler_for, scorer, train_step

VOCAB, LENGTH, MASKED = 50, 16, 3


def tiny_bert(seed: int = 0) -> BertForMaskedLM:
    """The user's own model, built from a config; no dropout, so two runs on the same rows train alike."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """The user's own causal LM, built offline from a config, without dropout as tiny_bert."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=LENGTH,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                      eos_token_id=None))


def masked_rows(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(VOCAB, (LENGTH,), generator=g),
             "mask_positions": torch.randperm(LENGTH, generator=g)[:MASKED].sort().values,
             "mask_labels": torch.randint(VOCAB, (MASKED,), generator=g)} for _ in range(n)]


def causal_rows(n: int, seed: int = 1) -> list[dict]:
    """Packed windows: LENGTH inputs and, shifted by one, their next tokens."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(VOCAB, (LENGTH + 1,), generator=g)} for _ in range(n)]


# the user's model, its rows, and the sift-train family that scores it
FAMILIES = {"bert": (tiny_bert, masked_rows, BertMLM), "gpt2": (tiny_gpt2, causal_rows, CausalLM)}


def arguments(tmp_path, batch: int, accumulate: int = 1, steps: int = 1, **extra) -> TrainingArguments:
    # plain SGD without clipping: the update is the gradient itself, so a mis-scaled loss shows in the weights
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                    max_steps=steps, learning_rate=0.5, optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**settings, **extra})


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sift_trainer_trains_a_tiny_model_and_logs_its_counts(tmp_path, name, accumulate):
    tiny, data, _ = FAMILIES[name]
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SiftTrainer(model, arguments(tmp_path, 6, accumulate, steps=3), train_dataset=data(40),
                          eval_dataset=data(12, seed=2), frac=0.5, exit_layer=1)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3
    for row in logs:
        assert (row["rows_scored"], row["rows_kept"], row["selected_steps"]) == (6 * accumulate, 3 * accumulate, 1)
        assert row["score_kept"] >= row["score_dropped"] > 0  # criterion=loss keeps the highest losses
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model trained
    assert trainer.evaluate()["eval_loss"] > 0


def test_sift_trainer_trains_a_resnet_on_its_own_batches(tmp_path):
    from sift_cli.models.resnet import ResNetClassifier

    torch.manual_seed(0)
    model = ResNetClassifier("resnet18", num_classes=5, image_size=8)
    g = torch.Generator().manual_seed(1)
    images = [{"images": torch.randn(3, 8, 8, generator=g), "labels": torch.randint(5, (), generator=g)}
              for _ in range(16)]
    before = model.net.fc.weight.clone()
    trainer = SiftTrainer(model, arguments(tmp_path, 8, steps=2), train_dataset=images, eval_dataset=images,
                          frac=0.25, exit_layer=2)
    trainer.train()
    assert [(r["rows_scored"], r["rows_kept"]) for r in trainer.state.log_history if "loss" in r] == [(8, 2)] * 2
    assert not torch.equal(before, model.net.fc.weight) and trainer.evaluate()["eval_loss"] > 0


def record_chosen(monkeypatch) -> list[dict]:
    """The sub-batches SiftTrainer keeps, step by step, as its selection returns them."""
    chosen, choose = [], hf.choose

    def recorded(model, batch, *args):
        keep, scores = choose(model, batch, *args)
        chosen.append({k: v[keep] for k, v in batch.items()})
        return keep, scores

    monkeypatch.setattr(hf, "choose", recorded)
    return chosen


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("frac,kept", [(0.5, [4, 3]), (1.0, [8, 6])])
def test_gradient_accumulation_updates_as_one_batch_of_the_kept_rows(tmp_path, monkeypatch, name, frac, kept):
    """Accumulating a batch of 8 and a short one of 6 at frac=0.5 (4 and 3 kept rows) updates as one batch of those
    7 rows: each kept row weighs 1/7; the Trainer's default, a mean of the two means, would weigh them 1/8 and 1/6.
    At frac=1, as one batch of all 14 rows."""
    chosen = record_chosen(monkeypatch)
    tiny, data, _ = FAMILIES[name]
    accumulated = tiny()
    SiftTrainer(accumulated, arguments(tmp_path / "a", 8, 2), train_dataset=data(14), frac=frac).train()
    assert [len(b["input_ids"]) for b in chosen] == kept
    rows = [{k: v[i] for k, v in b.items()} for b in chosen for i in range(len(b["input_ids"]))]
    whole = tiny()
    SiftTrainer(whole, arguments(tmp_path / "b", sum(kept)), train_dataset=rows, frac=1.0).train()
    start = tiny().state_dict()
    moved = False
    for (name, a), b in zip(accumulated.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(a, start[name])
    assert moved


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_sift_trainer_keeps_the_rows_the_cli_step_keeps(tmp_path, monkeypatch, name, criterion):
    """Its first step against sift-train's train_step, with the Selection and scorer trainer.py builds, on the
    same weights, batch and seed (args.seed)."""
    chosen = record_chosen(monkeypatch)
    tiny, rows, _ = FAMILIES[name]
    data = rows(8)
    SiftTrainer(tiny(), arguments(tmp_path, 8, seed=5), train_dataset=data, frac=0.4, exit_layer=2,
                criterion=criterion).train()
    updated = []

    def training_loss(rows):  # the CLI step's model call: records the rows it trains on
        updated.append(rows)
        return torch.zeros((), requires_grad=True)

    cpu, batch = torch.device("cpu"), {k: torch.stack([row[k] for row in data]) for k in data[0]}
    sel = Selection(0.4, criterion, 8, 4, 5, "local", cpu)
    train_step(training_loss, scorer(adapter(tiny()), 2, criterion), batch, None,
               grad_scaler_for("fp32", cpu), autocast_for("fp32", cpu), sel, 0)
    assert all(torch.equal(chosen[0][k], updated[0][k]) for k in batch)


def counted_scoring(monkeypatch, family) -> list:
    """The calls of `family`'s cheap pass, recorded as they happen."""
    calls, exit_scores = [], family.exit_scores

    def counted(*args, **kwargs):
        calls.append(args)
        return exit_scores(*args, **kwargs)

    monkeypatch.setattr(family, "exit_scores", counted)
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_frac_1_trains_every_row_without_a_scoring_pass(tmp_path, monkeypatch, name):
    tiny, data, family = FAMILIES[name]
    calls = counted_scoring(monkeypatch, family)
    trainer = SiftTrainer(tiny(), arguments(tmp_path / "a", 4, steps=2), train_dataset=data(8), frac=1.0)
    trainer.train()
    assert not calls
    assert [(r["rows_scored"], r["rows_kept"], r["selected_steps"])
            for r in trainer.state.log_history if "loss" in r] == [(4, 4, 0)] * 2
    SiftTrainer(tiny(), arguments(tmp_path / "b", 4, steps=2), train_dataset=data(8), frac=0.5).train()
    assert len(calls) == 2  # the counter counts: one scoring pass per selecting step


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_selection_window_selects_on_the_cli_schedule_of_global_steps(tmp_path, monkeypatch, accumulate):
    """selection_start=0.5, selection_every=2 over 8 steps, as the CLI's selection.start/every over trainer.max_steps:
    steps 4 and 6 score and keep half their rows; every other step is plain training on every row, unscored."""
    calls = counted_scoring(monkeypatch, CausalLM)
    trainer = SiftTrainer(tiny_gpt2(), arguments(tmp_path, 4, accumulate, steps=8), train_dataset=causal_rows(64),
                          frac=0.5, selection_start=0.5, selection_every=2)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    selecting = [s in (4, 6) for s in range(8)]
    assert [r["selected_steps"] for r in logs] == [int(s) for s in selecting]
    assert [(r["rows_scored"], r["rows_kept"]) for r in logs] == [(4 * accumulate, (2 if s else 4) * accumulate)
                                                                   for s in selecting]
    assert all(("score_kept" in r) == s for r, s in zip(logs, selecting))  # scores only where a step scored
    assert len(calls) == 2 * accumulate  # one pass per micro-batch of a selecting step
    cli = Selection(0.5, "loss", 4, 2, 0, "local", torch.device("cpu"), start=0.5, every=2)
    assert [cli.selects(s / 8, s) for s in range(8)] == selecting  # the CLI's step selects on the same steps


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoints_of_tied_weights_save_and_resume_to_the_same_weights(tmp_path, name):
    """The Trainer's default saves checkpoints (every 500 steps); tied embeddings and heads must not stop it, and a
    run resumed from its step-2 checkpoint must end where the uninterrupted one did."""
    tiny, data, _ = FAMILIES[name]
    whole = tiny()
    SiftTrainer(whole, arguments(tmp_path, 4, steps=4, save_strategy="steps", save_steps=2), train_dataset=data(16),
                frac=0.5, criterion="loss_proportional").train()  # draws at random: resume must draw the same
    resumed = tiny(seed=1)  # other weights: the checkpoint's must replace them
    SiftTrainer(resumed, arguments(tmp_path, 4, steps=4), train_dataset=data(16), frac=0.5,
                criterion="loss_proportional").train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kwargs,message", [
    ({"frac": 1.5}, r"frac=1.5 is outside \(0, 1\]"),
    ({"selection_start": 1.5}, r"selection_start=1.5 is outside \[0, 1\]; it is a fraction of the budget "
                               r"\(max_steps\)"),
    ({"selection_start": 0.6, "selection_end": 0.4}, "selection_start=0.6 is not below selection_end=0.4"),
    ({"selection_every": 0}, "selection_every=0 is not allowed"),
])
def test_bad_arguments_are_refused_before_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SiftTrainer(tiny_bert(), arguments(tmp_path, 4), train_dataset=masked_rows(8), **kwargs)


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_the_example_fine_tunes_a_tiny_model_and_saves_it_for_transformers_alone(tmp_path, corpus_file, model):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    done = subprocess.run([sys.executable, "examples/hf_trainer.py", "--model", model, "--text", str(corpus_file),
                           "--out", str(tmp_path), "--steps", "4", "--batch-size", "8", "--seq-len", "32",
                           "--vocab-size", "200"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'rows_scored': 8, 'rows_kept': 4" in done.stdout  # a log a step: 4 of the batch's 8 rows kept
    auto = AutoModelForCausalLM if model == "gpt2" else AutoModelForMaskedLM
    trained, tokenizer = auto.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(trained).__name__ == ("GPT2LMHeadModel" if model == "gpt2" else "BertForMaskedLM")
    ids = tokenizer(f"the quick function returns the {tokenizer.mask_token or 'length'}", return_tensors="pt")
    out = trained(input_ids=ids["input_ids"], labels=ids["input_ids"] if model == "gpt2" else None)
    assert out.logits.shape[-1] == len(tokenizer)
    assert model == "bert" or torch.isfinite(out.loss)  # the causal LM's own next-token loss on the text


DDP = """
import json, os, sys
import torch
sys.path[:0] = [os.environ["TESTS"], os.path.dirname(os.environ["TESTS"])]  # the tests' helpers, this checkout
from test_hf import FAMILIES, arguments
from sift_cli.hf import SiftTrainer

out, (tiny, data, _) = os.environ["OUT"], FAMILIES[os.environ["FAMILY"]]
model = tiny()
start = sum(p.detach().abs().sum().item() for p in model.parameters())
trainer = SiftTrainer(model, arguments(out, 4, steps=2), train_dataset=data(16), frac=0.5,
                      selection_every=int(os.environ["EVERY"]))
trainer.train()
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"distributed": trainer.accelerator.distributed_type.value, "start": start,
               "weights": sum(p.detach().abs().sum().item() for p in model.parameters()),
               "logs": [r for r in trainer.state.log_history if "loss" in r]}, f)
"""


@pytest.mark.parametrize("name,every", [("bert", 1), ("gpt2", 2)])
def test_under_ddp_each_process_selects_its_own_rows_and_the_logs_count_both(tmp_path, monkeypatch, name, every):
    """Two processes of 4 rows each; GPT-2 selects on every second step (step 0), both processes alike."""
    from test_distributed import torchrun

    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    for key, value in {"TESTS": REPO / "tests", "OUT": tmp_path, "FAMILY": name, "EVERY": every}.items():
        monkeypatch.setenv(key, str(value))
    done = torchrun(script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["distributed"] == "MULTI_CPU"
    for rank in ranks:  # 2 of each process's 4 rows on a selecting step, counted over both processes
        assert [(r["rows_scored"], r["rows_kept"]) for r in rank["logs"]] == [(8, 4), (8, 4 if every == 1 else 8)]
    # DDP synchronised the gradients of the kept rows: both processes hold the same trained weights
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)
    assert ranks[0]["weights"] != pytest.approx(ranks[0]["start"], rel=1e-6)
