"""ResNet behind the model contract: batch-norm statistics of the scoring pass, a step that compiles whole, and
preparing the step (FLOP count, compile warm-up) without changing any state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sift_cli.models.resnet import ResNetClassifier
from sift_cli.selection import select
from sift_cli.trainer import Selection, autocast_for, diagnose, grad_scaler_for, prepare_step


def model_and_batch(score_bn="batch", batch=8):
    torch.manual_seed(0)
    model = ResNetClassifier("resnet18", num_classes=5, image_size=8, score_bn=score_bn)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 8, 8, generator=g) * 3 + 1  # far from the initial running statistics
    return model, {"images": images, "labels": torch.randint(0, 5, (batch,), generator=g)}


def test_batch_statistics_scoring_matches_the_update_and_leaves_running_buffers_alone():
    model, batch = model_and_batch("batch")
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad(), model.scoring_mode():
        scores = model.exit_scores(batch, model.depth, "loss")
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name  # running means, variances and counters untouched
    assert model.training  # back in training mode for the update

    twin = copy.deepcopy(model).train()  # what the update sees: batch statistics
    with torch.no_grad():
        expected = F.cross_entropy(twin.net(batch["images"]), batch["labels"], reduction="none")
    assert torch.allclose(scores, expected, atol=1e-4)


def test_running_statistics_scoring_is_what_evaluation_sees_and_differs_early_in_training():
    model, batch = model_and_batch("running")
    with torch.no_grad(), model.scoring_mode():
        running = model.exit_scores(batch, model.depth, "loss")
        with model.scoring_mode("batch"):
            by_batch = model.exit_scores(batch, model.depth, "loss")
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = F.cross_entropy(twin.net(batch["images"]), batch["labels"], reduction="none")
    assert torch.allclose(running, expected, atol=1e-4)
    assert not torch.allclose(running, by_batch, atol=1e-2)  # untrained running stats: a different ranking input


@pytest.mark.parametrize("score_bn,other", [("batch", "running"), ("running", "batch")])
def test_diagnostics_rank_against_the_updates_loss_and_show_both_batch_norm_choices(score_bn, other):
    model, batch = model_and_batch(score_bn)
    row = diagnose(model, batch, 0.5, "loss", autocast_for("fp32", torch.device("cpu")))
    scored_like_update = row["spearman_k4"] if score_bn == "batch" else row["spearman_k4_batch"]
    assert scored_like_update == pytest.approx(1.0)  # the exact loss is the one the update sees
    assert {f"spearman_k1_{other}", f"overlap_k4_{other}"} <= set(row)


def test_bad_score_bn_is_one_line():
    from sift_cli.config import ConfigError

    with pytest.raises(ConfigError, match="model.score_bn=mean is not allowed; choose one of: batch, running"):
        ResNetClassifier("resnet18", num_classes=5, image_size=8, score_bn="mean")


@pytest.mark.parametrize("criterion", ["loss", "diverse"])
def test_scoring_selection_and_loss_compile_whole(criterion):
    """A graph break under fullgraph=True means a host sync or a data-dependent shape crept back in."""
    model, batch = model_and_batch()

    def cheap_pass(batch):
        return model.exit_scores(batch, 1, "loss", features=True)

    def update(batch, keep):
        return model({k: v[keep] for k, v in batch.items()})

    with torch.no_grad(), model.scoring_mode():
        scores, features = torch.compile(cheap_pass, fullgraph=True, backend="eager")(batch)
        eager_scores, _ = cheap_pass(batch)
    assert torch.allclose(scores, eager_scores, atol=1e-5)
    keep = torch.compile(select, fullgraph=True, backend="eager")(scores, 4, criterion, None, features)
    assert torch.equal(keep, select(scores, 4, criterion, None, features))
    loss = torch.compile(update, fullgraph=True, backend="eager")(batch, keep)
    assert torch.isfinite(loss)


def test_preparing_the_step_counts_and_compiles_without_changing_any_state(monkeypatch):
    """FLOP counting and the compile warm-up run whole steps before the clock: the weights, the optimizer's
    moments and the batch-norm running statistics must come out as they went in."""
    model, batch = model_and_batch()
    cfg = OmegaConf.create({"exit_layer": 1, "criterion": "loss", "trainer": {"compile": True, "compile_mode": None}})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sel = Selection(0.5, "loss", 8, 4, seed=0, scope="local", device=torch.device("cpu"))
    autocast, scaler = autocast_for("fp32", torch.device("cpu")), grad_scaler_for("fp32", torch.device("cpu"))
    eager = prepare_step(model, OmegaConf.merge(cfg, {"trainer": {"compile": False}}), optimizer, scaler, sel,
                         autocast, batch, 0, torch.device("cpu"))
    eager(batch, 0)  # one real update: moments to keep, running statistics moved off their initial values
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager", **kwargs))
    step = prepare_step(model, cfg, optimizer, scaler, sel, autocast, batch, 1, torch.device("cpu"))
    assert step.compiled and step.flops[True] > 0
    after = (model.state_dict(), optimizer.state_dict())
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value), name
    for index, moments in before[1]["state"].items():
        for key, value in moments.items():
            assert torch.equal(after[1]["state"][index][key], value), (index, key)
    assert all(p.grad is None for p in model.parameters())
