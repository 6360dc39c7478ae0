"""Criteria and select(): pure functions on tensors, shared by every model family.

Everything a training step calls keeps static shapes and never reads a value back to the host, so it traces
whole under torch.compile(fullgraph=True). The one exception is drawing from a torch.Generator, which Dynamo
cannot trace (pytorch/pytorch#93737): select() draws its noise eagerly and hands it to the traceable rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCORING_CRITERIA = ("loss", "entropy", "gradnorm", "loss_proportional", "diverse")  # need the scoring pass
FEATURE_CRITERIA = ("diverse",)  # also need per-sample features from that pass
TOP_CRITERIA = ("loss", "entropy", "gradnorm")  # keep the highest scores
DIVERSE_TIE = 1e-3  # weight of the normalised loss against the farthest-point distance in `diverse`


def prediction_scores(logits: Tensor, targets: Tensor, criterion: str) -> Tensor:
    """One score per prediction (row of logits): cross-entropy loss, predictive entropy or gradient-norm bound.

    `loss_proportional` and `diverse` rank by the loss. `gradnorm` is ||softmax(logits) - onehot(target)||_2,
    the norm of the loss's gradient w.r.t. the logits: the per-sample upper bound on the full gradient norm of
    Katharopoulos & Fleuret 2018, "Not All Samples Are Created Equal" (arXiv 1803.00942).
    """
    logits = logits.float()  # scores compare across samples: keep them out of bf16 rounding
    if criterion in ("loss", "loss_proportional", "diverse"):
        return F.cross_entropy(logits, targets, reduction="none")
    if criterion == "entropy":
        log_p = F.log_softmax(logits, dim=-1)
        return -(log_p.exp() * log_p).sum(dim=-1)
    if criterion == "gradnorm":
        # subtract the one-hot in place of building it: one_hot validates targets on the host
        p = logits.softmax(dim=-1)
        index = targets.unsqueeze(-1)
        return torch.linalg.vector_norm(p.scatter_add(-1, index, torch.full_like(index, -1, dtype=p.dtype)), dim=-1)
    raise ValueError(f"criterion {criterion!r} has no score; choose one of: {', '.join(SCORING_CRITERIA)}")


def top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores (ties broken by topk, always exactly `keep`)."""
    return torch.topk(scores, keep, sorted=False).indices


def gumbel_noise(n: int, generator: torch.Generator) -> Tensor:
    """`n` standard Gumbel draws on the generator's device (-log of an Exp(1) draw)."""
    return -torch.empty(n, device=generator.device).exponential_(generator=generator).log()


def loss_proportional(scores: Tensor, keep: int, frac: float, noise: Tensor) -> Tensor:
    """Selective Backprop's rule: `keep` distinct rows drawn without replacement, weight percentile ** beta.

    Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers" (arXiv 1910.00762): a
    sample's weight is its loss percentile in the batch raised to beta = 1/frac - 1. The percentile is Composer's
    (composer.algorithms.selective_backprop): (rank + 0.5) / B, rank 0 the lowest loss, so it lies in (0, 1) and
    the lowest-loss sample keeps a small chance. Composer draws int(keep * B) rows without replacement with these
    weights (numpy's successive sampling); we draw exactly `keep`, as every arm here back-propagates the same
    count. The original code and SageMaker smart sifting instead keep each sample by its own Bernoulli draw
    (percentile over a loss history ** beta), a random count per batch. Without replacement is done statically
    by Gumbel-top-k (Efraimidis & Spirakis 2006; Kool et al. 2019): topk of log(weight) + Gumbel noise is a
    Plackett-Luce draw, the same distribution as successive sampling. `noise`: gumbel_noise(B, ...).
    """
    batch_size = scores.shape[0]
    ranks = scores.argsort().argsort()
    percentile = (ranks.to(noise.dtype) + 0.5) / batch_size
    return top((1.0 / frac - 1.0) * percentile.log() + noise.to(scores.device), keep)


def diverse(scores: Tensor, features: Tensor, keep: int) -> Tensor:
    """Greedy k-center (farthest-point) selection on the features, loss as the tie-breaker.

    The diversity-aware baseline the SIFT paper (arXiv 2402.07052) suggests. Starts from the highest-loss
    sample, then `keep - 1` times adds the sample farthest from the chosen set: the one maximising its smallest
    Euclidean distance to any chosen sample plus DIVERSE_TIE * s * its min-max normalised loss in the batch,
    s the largest pairwise distance in the batch (1 if all features are equal). So among samples about equally
    far the higher loss wins, and with identical features the order is by loss. Returns `keep` distinct rows in
    the order chosen. `features` [B, D]: e.g. the mean-pooled hidden states at the exit layer. One B x B
    distance matrix, then `keep` steps of O(B) each, unrolled by torch.compile.
    """
    # exact differences rather than the matrix-product form: that one blurs small distances
    dist = torch.cdist(features.float(), features.float(), compute_mode="donot_use_mm_for_euclid_dist")
    low = scores.min()
    loss = (scores - low) / (scores.max() - low).clamp_min(torch.finfo(scores.dtype).tiny)
    scale = dist.max()
    # the tie term is the candidate's own, so it can ride on every distance to it: min(d) + t = min(d + t)
    key = dist + DIVERSE_TIE * torch.where(scale > 0, scale, torch.ones_like(scale)) * loss
    key.fill_diagonal_(float("-inf"))  # a chosen row's own entry sinks it below every candidate for good
    nxt = scores.argmax().unsqueeze(0)
    chosen, reach = [nxt], key[nxt]  # [1, B]: a tensor index keeps the row's index on the device
    for _ in range(keep - 1):
        nxt = reach.argmax(dim=1)
        chosen.append(nxt)
        reach = torch.minimum(reach, key[nxt])
    return torch.cat(chosen)


def select(scores: Tensor, kept: int, criterion: str, generator: torch.Generator, features: Tensor | None = None,
           frac: float | None = None) -> Tensor:
    """`kept` distinct row indices of the scored batch, by the criterion's rule (a LongTensor on scores' device).

    loss, entropy, gradnorm: the highest scores. loss_proportional: see loss_proportional(); `frac` sets its
    beta (default kept / B). diverse: see diverse(); needs `features`. The random arm never scores: random_subset.
    """
    if criterion in TOP_CRITERIA:
        return top(scores, kept)
    if criterion == "loss_proportional":
        return loss_proportional(scores, kept, kept / scores.shape[0] if frac is None else frac,
                                 gumbel_noise(scores.shape[0], generator))
    if criterion == "diverse":
        if features is None:
            raise ValueError("criterion 'diverse' needs per-sample features")
        return diverse(scores, features, kept)
    raise ValueError(f"criterion {criterion!r} does not select by scores; choose one of: {', '.join(SCORING_CRITERIA)}")


def random_subset(batch_size: int, keep: int, generator: torch.Generator) -> Tensor:
    """`keep` distinct indices drawn uniformly on the generator's device: the control arm, no scoring pass."""
    return torch.randperm(batch_size, generator=generator, device=generator.device)[:keep]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties get their average rank)."""
    from scipy.stats import spearmanr  # diagnostics only, off the training clock

    return float(spearmanr(a.float().cpu().numpy(), b.float().cpu().numpy()).statistic)


def overlap(chosen: Tensor, reference: Tensor) -> float:
    """Fraction of the reference selection that `chosen` also selects."""
    return torch.isin(chosen, reference).float().mean().item()
