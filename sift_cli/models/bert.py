"""BERT for masked-language modelling, behind the model contract.

The exit head is the model's own MLM head applied to encoder layer k: no new parameters. Both the
cheap pass and the training forward apply that head only at masked positions, since over every
position a large vocabulary head costs more than several encoder layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertForMaskedLM

from sift_cli.config import ConfigError, first_line
from sift_cli.selection import per_sample_mean, prediction_scores

IGNORE = -100  # label of a position that is not predicted (transformers' convention)


def load_pretrained(name_or_path: str) -> BertForMaskedLM:
    try:
        return BertForMaskedLM.from_pretrained(name_or_path, attn_implementation="sdpa")
    except Exception as err:  # missing files, bad JSON, truncated weights: each its own exception type
        raise ConfigError(
            f"model.pretrained={name_or_path} could not be loaded as a BERT checkpoint "
            f"(a folder written by save_pretrained or a hub name): {first_line(err)}"
        ) from None


class BertMLM(nn.Module):
    task = "mlm"

    def __init__(
        self,
        vocab_size: int,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: Optional[int] = None,
        max_position: int = 512,
        dropout: float = 0.1,
        pretrained: Optional[str] = None,
    ):
        super().__init__()
        if pretrained:
            self.mlm = load_pretrained(pretrained)
        else:  # random weights, as in pre-training
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                max_position_embeddings=max_position,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            config._attn_implementation = "sdpa"
            self.mlm = BertForMaskedLM(config)
        self.depth = self.mlm.config.num_hidden_layers

    def _encode(self, input_ids: Tensor, k: int) -> Tensor:
        """Hidden states after encoder layer k. Sequences are packed, so there is no padding mask."""
        h = self.mlm.bert.embeddings(input_ids=input_ids)
        for layer in self.mlm.bert.encoder.layer[:k]:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h  # transformers 4 returns a tuple, 5 a tensor
        return h

    def _masked_logits(self, batch: dict, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """MLM-head logits at the masked positions only, their targets, and each one's sample index."""
        labels = batch["labels"]
        rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
        h = self._encode(batch["input_ids"], k)
        return self.mlm.cls(h[rows, cols]), labels[rows, cols], rows

    def exit_scores(self, batch: dict, k: int, criterion: str) -> Tensor:
        logits, targets, rows = self._masked_logits(batch, k)
        return per_sample_mean(prediction_scores(logits, targets, criterion), rows, len(batch["labels"]))

    def loss(self, batch: dict) -> Tensor:
        logits, targets, _ = self._masked_logits(batch, self.depth)
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        logits, targets, _ = self._masked_logits(batch, self.depth)
        return {
            "loss_sum": F.cross_entropy(logits.float(), targets, reduction="sum"),
            "correct": (logits.argmax(-1) == targets).sum(),
            "count": torch.tensor(len(targets), device=targets.device),
        }
