"""The model families behind the model contract (exit_scores, scoring_mode, loss, evaluate, depth)."""

import contextlib

from torch import nn


@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Every submodule's train/eval flag as it was before: a model's scoring_mode leaves it in training mode,
    which a user's model, adopted as it is, must not be left in."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
