"""The library API: select() keeps ceil(frac*B) rows, the CLI step's rows, and leaves the model as it was."""

import math

import pytest
import torch

import sift_cli
from sift_cli.api import adapter, select
from sift_cli.config import CRITERIA, step_sizes
from sift_cli.data.order import seeded
from sift_cli.models.bert import BertMLM
from sift_cli.models.resnet import ResNetClassifier
from sift_cli.trainer import Selection, autocast_for, grad_scaler_for, scorer, train_step

FAMILIES = ("bert", "hf_bert", "resnet")
CPU = torch.device("cpu")


def family(name: str, seed: int = 0):
    """(the model select() is given, the sift-train model with the same weights, a batch of 10 rows)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "resnet":
        model = ResNetClassifier("resnet18", num_classes=5, image_size=8)
        return model, model, {"images": torch.randn(10, 3, 8, 8, generator=g),
                              "labels": torch.randint(5, (10,), generator=g)}
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


def test_a_hugging_face_bert_is_wrapped_without_copying_its_weights():
    hf = family("hf_bert")[0]
    wrapped = adapter(hf)
    assert wrapped.mlm is hf and wrapped.depth == hf.config.num_hidden_layers
    with pytest.raises(TypeError, match="Linear has no SIFT adapter"):
        adapter(torch.nn.Linear(2, 2))


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
