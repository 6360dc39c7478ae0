"""The model families behind the model contract (exit_scores, scoring_mode, loss, evaluate, depth)."""

import contextlib
from typing import Optional

from torch import nn


class DropoutOffScoring:
    """The cheap pass's mode of a model without batch norm (BERT, decoders): dropout off; score_bn, which
    chooses batch norm's statistics, has no say here."""

    @contextlib.contextmanager
    def scoring_mode(self, score_bn: Optional[str] = None):
        self.eval()
        try:
            yield
        finally:
            self.train()


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
