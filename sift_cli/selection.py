"""Criteria and select(): pure functions on tensors, shared by every model family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prediction_scores(logits: Tensor, targets: Tensor, criterion: str) -> Tensor:
    """One score per prediction (row of logits): cross-entropy loss or predictive entropy."""
    logits = logits.float()  # scores compare across samples: keep them out of bf16 rounding
    if criterion == "loss":
        return F.cross_entropy(logits, targets, reduction="none")
    if criterion == "entropy":
        log_p = F.log_softmax(logits, dim=-1)
        return -(log_p.exp() * log_p).sum(dim=-1)
    raise ValueError(f"criterion {criterion!r} has no score")


def per_sample_mean(values: Tensor, rows: Tensor, batch_size: int) -> Tensor:
    """Mean of `values` grouped by sample index `rows`; a sample with no values scores 0."""
    # index_add rather than bincount: bincount sizes its output from the data, a host sync on CUDA
    zeros = torch.zeros(batch_size, device=values.device, dtype=values.dtype)
    sums = zeros.index_add(0, rows, values)
    counts = zeros.index_add(0, rows, torch.ones_like(values)).clamp_(min=1)
    return sums / counts


def top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores (ties broken by topk, always exactly `keep`)."""
    return torch.topk(scores, keep, sorted=False).indices


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
