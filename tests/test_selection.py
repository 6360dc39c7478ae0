import math

import pytest
import torch

from sift_cli.config import step_sizes
from sift_cli.selection import overlap, per_sample_mean, prediction_scores, random_subset, spearman, top


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


def test_per_sample_mean_groups_by_row_and_scores_empty_rows_zero():
    values = torch.tensor([1.0, 3.0, 5.0])
    rows = torch.tensor([0, 0, 2])
    assert per_sample_mean(values, rows, 3).tolist() == [2.0, 0.0, 5.0]


def test_rank_diagnostics():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert overlap(torch.tensor([0, 1]), torch.tensor([1, 2])) == 0.5
