"""The library API: select() keeps ceil(frac*B) rows, the CLI step's rows, and leaves the model as it was."""

import math

import pytest
import torch

import sift_cli
from sift_cli.api import adapter, select
from sift_cli.config import CRITERIA, step_sizes
from sift_cli.data.order import seeded
from sift_cli.models.bert import BertMLM
from sift_cli.models.decoder import CausalLM
from sift_cli.models.resnet import ResNetClassifier
from sift_cli.trainer import Selection, autocast_for, grad_scaler_for, scorer, train_step

FAMILIES = ("bert", "hf_bert", "resnet", "causal", "hf_gpt2", "hf_llama")
CPU = torch.device("cpu")


def family(name: str, seed: int = 0):
    """(the model select() is given, the sift-train model with the same weights, a batch of 10 rows)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "resnet":
        model = ResNetClassifier("resnet18", num_classes=5, image_size=8)
        return model, model, {"images": torch.randn(10, 3, 8, 8, generator=g),
                              "labels": torch.randint(5, (10,), generator=g)}
    if name in ("causal", "hf_gpt2", "hf_llama"):  # windows of 16 inputs and their 16 next tokens
        model = CausalLM(vocab_size=50, seq_len=16, arch="llama" if name == "hf_llama" else "gpt2", num_layers=3,
                         hidden_size=32, num_heads=2, intermediate_size=64, max_position=32, dropout=0.1)
        # hf_*: the user's own transformers causal LM, the very module CausalLM wraps
        return (model if name == "causal" else model.lm), model, {"input_ids": torch.randint(50, (10, 17), generator=g)}
    model = BertMLM(vocab_size=50, num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, max_position=16)
    positions = torch.rand(10, 16, generator=g).topk(3, dim=1).indices.sort(dim=1).values
    batch = {"input_ids": torch.randint(50, (10, 16), generator=g), "mask_positions": positions,
             "mask_labels": torch.randint(50, (10, 3), generator=g)}
    # hf_bert: the user's own transformers BertForMaskedLM, the very module BertMLM wraps
    return (model.mlm if name == "hf_bert" else model), model, batch


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("frac", [0.3, 0.55])
def test_select_keeps_ceil_frac_rows_and_leaves_the_model_as_it_was(name, criterion, frac):
    model, _, batch = family(name)
    for training in (True, False):
        model.train(training)
        modes, before = [m.training for m in model.modules()], snapshot(model)
        index, kept = select(model, batch, exit_layer=2, frac=frac, criterion=criterion)
        assert len(index) == math.ceil(frac * 10) == len(set(index.tolist()))
        for key, value in batch.items():
            assert torch.equal(kept[key], value[index])
        assert [m.training for m in model.modules()] == modes
        after = snapshot(model)
        assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and batch-norm statistics
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_select_keeps_the_rows_the_cli_step_keeps(name, criterion):
    """The CLI's Selection and scorer, built as trainer.py builds them, run through its train_step: the rows it
    back-propagates are select()'s rows, for the same weights, batch and seed."""
    model, core, batch = family(name)
    frac, exit_layer, seed, step = 0.4, 2, 7, 3
    scored, kept = step_sizes(10, frac, "scored")
    sel = Selection(frac, criterion, scored, kept, seed, "local", CPU)
    updated = []

    def training_loss(rows):  # the step's model call: records the rows it trains on
        updated.append(rows)
        return torch.zeros((), requires_grad=True)

    core.train()
    train_step(training_loss, scorer(core, exit_layer, criterion), batch, None, grad_scaler_for("fp32", CPU),
               autocast_for("fp32", CPU), sel, step)
    index, chosen = select(model, batch, exit_layer, frac, criterion, generator=seeded(seed, "select", step))
    assert len(index) == kept
    for key in batch:
        assert torch.equal(chosen[key], updated[0][key])


@pytest.mark.parametrize("name", FAMILIES)
def test_frac_1_keeps_every_row_without_a_scoring_pass(name, monkeypatch):
    model, core, batch = family(name)
    calls, exit_scores = [], type(core).exit_scores

    def counted(*args, **kwargs):
        calls.append(args)
        return exit_scores(*args, **kwargs)

    monkeypatch.setattr(type(core), "exit_scores", counted)
    index, kept = select(model, batch, frac=1.0)
    assert index.tolist() == list(range(10)) and all(torch.equal(kept[k], batch[k]) for k in batch)
    assert not calls
    select(model, batch, frac=0.5)  # the counter counts: a selection does score
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_llama"])
def test_a_hugging_face_model_is_wrapped_once_without_copying_its_weights(name):
    hf = family(name)[0]
    keys, modules = list(hf.state_dict()), list(hf.modules())
    wrapped = adapter(hf)
    assert (wrapped.mlm if name == "hf_bert" else wrapped.lm) is hf and wrapped.depth == hf.config.num_hidden_layers
    assert all(p is q for p, q in zip(wrapped.parameters(), hf.parameters()))
    assert adapter(hf) is wrapped  # adapted once: the causal adapter's check of its blocks does not recur
    assert list(hf.state_dict()) == keys and list(hf.modules()) == modules  # nothing joined the user's model


def test_models_without_an_adapter_or_a_causal_pass_are_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="Linear has no SIFT adapter"):
        adapter(torch.nn.Linear(2, 2))
    eager = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                       attn_implementation="eager"))
    with pytest.raises(ValueError, match="uses attn_implementation='eager'.*set_attn_implementation"):
        adapter(eager)
    eager.set_attn_implementation("sdpa")  # what the message says to do
    assert len(select(eager, {"input_ids": torch.randint(50, (4, 17))})[0]) == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"frac": 0}, r"frac=0 is outside \(0, 1\]"),
    ({"criterion": "los"}, "criterion='los' is not allowed; choose one of: loss, entropy"),
    ({"exit_layer": 4}, r"exit_layer=4 is outside this BertMLM's blocks; choose 1..3"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    model, _, batch = family("bert")
    with pytest.raises(ValueError, match=message):
        select(model, batch, **kwargs)


def test_the_package_offers_select_without_loading_torch_on_import():
    import subprocess
    import sys

    code = "import sys, sift_cli; assert 'torch' not in sys.modules; assert callable(sift_cli.select)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert sift_cli.select is select
