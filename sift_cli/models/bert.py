"""BERT for masked-language modelling, behind the model contract.

A batch holds `input_ids` [B, L] and, for every row, the same number P of masked positions
(`mask_positions` [B, P]) with their original tokens (`mask_labels` [B, P]): the original BERT
recipe's fixed count per sequence, so every shape on the hot path is static. The exit head is the
model's own MLM head applied to encoder layer k: no new parameters. Both the cheap pass and the
training forward apply that head only at the masked positions, since over every position a large
vocabulary head costs more than several encoder layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertForMaskedLM

from sift_cli.config import ConfigError, first_line
from sift_cli.models import DropoutOffScoring
from sift_cli.selection import prediction_scores


def load_pretrained(name_or_path: str) -> BertForMaskedLM:
    try:
        return BertForMaskedLM.from_pretrained(name_or_path, attn_implementation="sdpa")
    except Exception as err:  # missing files, bad JSON, truncated weights: each its own exception type
        raise ConfigError(
            f"model.pretrained={name_or_path} could not be loaded as a BERT checkpoint "
            f"(a folder written by save_pretrained or a hub name): {first_line(err)}"
        ) from None


class AutocastLayerNorm(nn.LayerNorm):
    """A LayerNorm that takes and returns autocast's dtype (bf16, fp16) rather than the fp32 autocast gives it.

    CUDA autocast runs layer_norm in fp32, so every norm writes fp32 and the residual stream that adds to its
    output stays fp32: twice the bytes of bf16 in the kernels between the matrix products, which are bound by
    memory bandwidth. Here the norm's input, weight and output are in the autocast dtype (the kernel
    still accumulates its statistics in fp32), so the whole encoder runs in it: the low-precision LayerNorm of
    MosaicML's BERT and MPT recipes. Without autocast it is nn.LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                                self.eps)


def autocast_layer_norms(model: nn.Module) -> None:
    """Replace every nn.LayerNorm in `model` by an AutocastLayerNorm with the same parameters."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.LayerNorm:
                norm = AutocastLayerNorm(child.normalized_shape, child.eps, device=child.weight.device)
                norm.load_state_dict(child.state_dict())
                setattr(parent, name, norm)


class BertMLM(DropoutOffScoring, nn.Module):
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
        low_precision_layernorm: bool = False,
    ):
        super().__init__()
        sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
                 "intermediate_size": intermediate_size, "max_position": max_position}
        for key, size in sizes.items():
            if size is not None and size < 1:
                raise ConfigError(f"model.{key}={size} must be at least 1")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout={dropout} is not allowed; use a probability in [0, 1), e.g. 0.1")
        if pretrained:
            self.mlm = load_pretrained(pretrained)
        else:  # random weights, as in pre-training
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
                max_position_embeddings=max_position,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            config._attn_implementation = "sdpa"
            self.mlm = BertForMaskedLM(config)
        if low_precision_layernorm:
            autocast_layer_norms(self.mlm)
        self._adopt(self.mlm)

    def _adopt(self, mlm: BertForMaskedLM) -> None:
        self.mlm = mlm
        self.depth = mlm.config.num_hidden_layers
        self.max_length = mlm.config.max_position_embeddings

    @classmethod
    def around(cls, mlm: BertForMaskedLM) -> "BertMLM":
        """A BertMLM over a BertForMaskedLM built elsewhere (a user's model): the same module, its weights shared,
        not copied, so training either trains both."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._adopt(mlm)
        return model

    def save_pretrained(self, folder: Path) -> None:
        """The model as transformers saves it: AutoModelForMaskedLM loads it, and model.pretrained takes it back."""
        self.mlm.save_pretrained(folder)

    def _encode(self, input_ids: Tensor, k: int) -> Tensor:
        """Hidden states after encoder layer k. Sequences are packed, so there is no padding mask."""
        h = self.mlm.bert.embeddings(input_ids=input_ids)
        for layer in self.mlm.bert.encoder.layer[:k]:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h  # transformers 4 returns a tuple, 5 a tensor
        return h

    def _masked(self, batch: dict, k: int) -> tuple[Tensor, Tensor]:
        """Hidden states after layer k at the masked positions [B, P, H], and the full hidden states."""
        h = self._encode(batch["input_ids"], k)
        index = batch["mask_positions"].unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return h.gather(1, index), h

    def exit_scores(self, batch: dict, k: int, criterion: str, features: bool = False):
        """Mean score over each row's masked tokens; with features, also the mean-pooled hidden state."""
        masked, h = self._masked(batch, k)
        logits = self.mlm.cls(masked)
        scores = prediction_scores(logits.flatten(0, 1), batch["mask_labels"].flatten(), criterion)
        scores = scores.view(batch["mask_labels"].shape).mean(1)
        return (scores, h.float().mean(1)) if features else scores

    def loss(self, batch: dict) -> Tensor:
        logits = self.mlm.cls(self._masked(batch, self.depth)[0])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["mask_labels"].flatten())

    def forward(self, batch: dict) -> Tensor:
        """The training loss: DistributedDataParallel and torch.compile wrap the module's call."""
        return self.loss(batch)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        logits = self.mlm.cls(self._masked(batch, self.depth)[0]).flatten(0, 1).float()
        targets = batch["mask_labels"].flatten()
        return {
            "loss_sum": F.cross_entropy(logits, targets, reduction="sum"),
            "correct": (logits.argmax(-1) == targets).sum(),
            "count": torch.tensor(targets.numel(), device=targets.device),
        }
