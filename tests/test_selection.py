import math

import pytest
import torch

from sift_cli.config import step_sizes
from sift_cli.selection import (
    FEATURE_CRITERIA, SCORING_CRITERIA, diverse, gumbel_noise, loss_proportional, overlap, prediction_scores,
    random_subset, select, spearman, top,
)


def test_top_keeps_exactly_the_largest_scores():
    scores = torch.randn(64, generator=torch.Generator().manual_seed(0))
    kept = top(scores, 16)
    assert sorted(kept.tolist()) == sorted(scores.argsort(descending=True)[:16].tolist())


def test_top_with_ties_keeps_exactly_k_and_never_a_lower_score():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 3.0, 2.0, 2.0])
    kept = top(scores, 3)
    assert len(kept) == 3 and len(set(kept.tolist())) == 3
    assert scores[kept].min() >= scores[[i for i in range(8) if i not in kept.tolist()]].max()


@pytest.mark.parametrize("batch_size,frac,expected", [
    (32, 1.0, (32, 32)), (32, 0.5, (32, 16)), (10, 0.3, (10, 3)), (10, 0.31, (10, 4)),
    (8, 0.01, (8, 1)), (7, 0.5, (7, 4)),
])
def test_step_sizes_keep_ceil_frac_b(batch_size, frac, expected):
    assert step_sizes(batch_size, frac, "scored") == expected


def test_step_sizes_updated_mode_holds_the_update_batch():
    assert step_sizes(32, 0.5, "updated") == (64, 32)
    assert step_sizes(32, 0.3, "updated") == (math.ceil(32 / 0.3), 32)
    assert step_sizes(32, 1.0, "updated") == (32, 32)


def test_random_subset_keeps_the_right_count_reproducibly():
    draw = lambda seed: random_subset(32, 16, torch.Generator().manual_seed(seed))
    a, b, c = draw(0), draw(0), draw(1)
    assert len(a) == 16 and len(set(a.tolist())) == 16 and a.max() < 32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_and_entropy_scores():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    loss = prediction_scores(logits, targets, "loss")
    assert torch.allclose(loss, -torch.log_softmax(logits, -1)[[0, 1], [0, 1]])
    entropy = prediction_scores(logits, targets, "entropy")
    assert torch.allclose(entropy[1], torch.tensor(math.log(3)))
    assert entropy[0] < entropy[1]


def test_rank_diagnostics():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert overlap(torch.tensor([0, 1]), torch.tensor([1, 2])) == 0.5


def scored_batch(batch_size: int, seed: int = 0, dim: int = 8):
    """Scores and features for one batch, as a model's scoring pass would give them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, generator=g), torch.randn(batch_size, dim, generator=g)


def select_with(scores, features, kept, criterion, seed=0, frac=None):
    return select(scores, kept, criterion, torch.Generator().manual_seed(seed),
                  features if criterion in FEATURE_CRITERIA else None, frac)


@pytest.mark.parametrize("criterion", SCORING_CRITERIA)
@pytest.mark.parametrize("batch_size,frac", [(7, 0.5), (10, 0.99), (32, 0.3), (64, 0.1), (64, 0.75)])
def test_select_keeps_exactly_ceil_frac_b_distinct_rows(criterion, batch_size, frac):
    kept = math.ceil(frac * batch_size)
    scores, features = scored_batch(batch_size)
    rows = select_with(scores, features, kept, criterion, frac=frac)
    assert rows.dtype == torch.long and rows.shape == (kept,)
    assert len(set(rows.tolist())) == kept and 0 <= rows.min() and rows.max() < batch_size


@pytest.mark.parametrize("criterion", SCORING_CRITERIA)
def test_select_is_deterministic_under_a_seeded_generator(criterion):
    scores, features = scored_batch(64)
    assert torch.equal(select_with(scores, features, 16, criterion, seed=3),
                       select_with(scores, features, 16, criterion, seed=3))


def test_loss_proportional_depends_on_the_seed():
    scores, _ = scored_batch(64)
    draws = {tuple(sorted(select_with(scores, None, 16, "loss_proportional", seed=s).tolist())) for s in range(5)}
    assert len(draws) > 1


def kept_counts(scores, kept, draws):
    """How often each row is kept over `draws` loss-proportional selections from one generator."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(scores))
    for _ in range(draws):
        counts[select(scores, kept, "loss_proportional", generator, frac=kept / len(scores))] += 1
    assert counts.sum() == draws * kept
    return counts


def test_loss_proportional_prefers_high_loss_rows():
    scores, _ = scored_batch(32)
    counts = kept_counts(scores, 8, 2000)
    percentile = (scores.argsort().argsort() + 1).float() / 32
    assert (counts * percentile).sum() / counts.sum() > 0.75  # uniform would give about 0.5
    assert counts[scores.argmax()] > 0.6 * 2000 and counts[scores.argmin()] < 0.01 * 2000


def test_loss_proportional_gives_the_lowest_loss_a_chance():
    scores, _ = scored_batch(4)
    counts = kept_counts(scores, 2, 2000)  # beta = 1: weights 1/8, 3/8, 5/8, 7/8
    assert 0 < counts[scores.argmin()] < counts[scores.argmax()]


def test_loss_proportional_is_uniform_at_frac_one_and_sharpens_as_frac_falls():
    scores, _ = scored_batch(16)
    noise = gumbel_noise(16, torch.Generator().manual_seed(0))
    # beta = 0: the weights are equal and the noise alone decides; small frac: the loss order decides
    assert torch.equal(loss_proportional(scores, 4, 1.0, noise), top(noise, 4))
    assert set(loss_proportional(scores, 4, 0.001, noise).tolist()) == set(top(scores, 4).tolist())


def clusters(per_cluster: int = 8, seed: int = 0):
    """4 clusters 100 apart, each the same regular polygon of radius 1, rows shuffled; and their cluster ids."""
    angles = torch.arange(per_cluster) * (2 * math.pi / per_cluster)
    ring = torch.stack([angles.cos(), angles.sin()], dim=1)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    features = (centres[:, None] + ring[None]).flatten(0, 1)
    ids = torch.arange(4).repeat_interleave(per_cluster)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return features[order], ids[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diverse_takes_one_per_cluster_before_a_second_from_any(seed):
    features, ids = clusters(seed=seed)
    scores, _ = scored_batch(len(ids), seed)
    four = select(scores, 4, "diverse", torch.Generator(), features)
    assert four[0] == scores.argmax()  # starts from the highest loss
    assert sorted(ids[four].tolist()) == [0, 1, 2, 3]
    eight = select(scores, 8, "diverse", torch.Generator(), features)
    assert torch.equal(eight[:4], four)
    assert sorted(ids[eight[:4]].tolist()) == [0, 1, 2, 3]
    assert sorted(ids[eight].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_diverse_breaks_ties_by_loss():
    scores, _ = scored_batch(16)
    same = torch.zeros(16, 4)  # every sample equally far: the loss order decides
    assert torch.equal(diverse(scores, same, 5), scores.argsort(descending=True)[:5])


def test_gradnorm_is_the_norm_of_the_loss_gradient_wrt_the_logits():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 5, generator=g)).requires_grad_()
    targets = torch.randint(0, 5, (6,), generator=g)
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    expected = torch.linalg.vector_norm(logits.grad, dim=-1)
    assert torch.allclose(prediction_scores(logits.detach(), targets, "gradnorm"), expected, atol=1e-6)


def test_unknown_or_unscored_criteria_raise():
    scores, features = scored_batch(8)
    for criterion in ("random", "losss"):
        with pytest.raises(ValueError, match=criterion):
            select(scores, 4, criterion, torch.Generator())
    with pytest.raises(ValueError, match="features"):
        select(scores, 4, "diverse", torch.Generator())
    with pytest.raises(ValueError, match="random"):
        prediction_scores(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "random")


def compiled(fn):
    """fn traced whole: a graph break (a host sync, a data-dependent shape) raises."""
    return torch.compile(fn, fullgraph=True, backend="eager")


@pytest.mark.parametrize("criterion", ["loss", "entropy", "gradnorm"])
def test_scores_trace_without_a_graph_break(criterion):
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(12, 7, generator=g), torch.randint(0, 7, (12,), generator=g)
    assert torch.equal(compiled(prediction_scores)(logits, targets, criterion),
                       prediction_scores(logits, targets, criterion))


def test_selection_rules_trace_without_a_graph_break():
    scores, features = scored_batch(32)
    noise = gumbel_noise(32, torch.Generator().manual_seed(0))
    assert torch.equal(compiled(top)(scores, 8), top(scores, 8))
    assert torch.equal(compiled(loss_proportional)(scores, 8, 0.25, noise), loss_proportional(scores, 8, 0.25, noise))
    assert torch.equal(compiled(diverse)(scores, features, 4), diverse(scores, features, 4))
    # select() itself traces for the rules that draw no noise (Dynamo cannot trace a Generator's draws) ...
    for criterion, feats in (("gradnorm", None), ("diverse", features)):
        assert torch.equal(compiled(select)(scores, 4, criterion, torch.Generator(), feats),
                           select(scores, 4, criterion, torch.Generator(), feats))
    # ... and for loss_proportional it is gumbel_noise, drawn eagerly, then the traced rule
    assert torch.equal(select(scores, 8, "loss_proportional", torch.Generator().manual_seed(0), frac=0.25),
                       loss_proportional(scores, 8, 0.25, noise))
