"""SIFT in your own training loop: `select` scores a batch with a model's cheap pass and keeps the rows worth a
backward pass.

Built from the pieces sift-train's step uses (trainer.scorer for the cheap pass, trainer.Selection.keep and the
rules of selection.py for the choice, config.step_sizes for the count), not a second implementation: for the
same weights, batch and random draws, `select` keeps the rows the CLI keeps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sift_cli import distributed
from sift_cli.config import CRITERIA, step_sizes
from sift_cli.models import modes_kept
from sift_cli.trainer import Selection, rows, scorer, take

CONTRACT = ("exit_scores", "scoring_mode", "loss", "depth")  # what the step asks of a model
ADAPTED = "_sift_adapter"  # where a model built elsewhere keeps its adapter


def _bert_for_masked_lm(model: nn.Module) -> Optional[nn.Module]:
    from transformers import BertForMaskedLM

    if isinstance(model, BertForMaskedLM):
        from sift_cli.models.bert import BertMLM

        return BertMLM.around(model)
    return None


def _causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """A transformers causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...: a class AutoModelForCausalLM builds, or a
    subclass of one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(c.__name__ in causal for c in type(model).__mro__):
        from sift_cli.models.decoder import CausalLM

        return CausalLM.around(model)
    return None


# Each entry turns a model built elsewhere into one behind the contract, or answers None: a new family adds its
# function here and select() and SiftTrainer take it as they are.
ADAPTERS: list[Callable[[nn.Module], Optional[nn.Module]]] = [_bert_for_masked_lm, _causal_lm]


def adapter(model: nn.Module) -> nn.Module:
    """`model` behind the model contract: sift-train's own models (BertMLM, CausalLM, ResNetClassifier) as they
    are, a Hugging Face model wrapped by its family's adapter (its weights shared, not copied). DDP's wrapper is
    looked through: scoring needs no gradient synchronisation. A model is adapted once, on its first call: the
    adapter is kept on it (a plain attribute, outside its modules and state_dict), since a causal LM's adapter
    checks its blocks with a forward pass and a host sync that must not recur at every select()."""
    model = distributed.unwrap(model)
    if all(hasattr(model, name) for name in CONTRACT):
        return model
    if ADAPTED in vars(model):
        return vars(model)[ADAPTED]
    for wrap in ADAPTERS:
        found = wrap(model)
        if found is not None:
            object.__setattr__(model, ADAPTED, found)  # not nn.Module's: that would make it a submodule
            return found
    raise TypeError(f"{type(model).__name__} has no SIFT adapter; pass a sift_cli model (BertMLM, CausalLM, "
                    f"ResNetClassifier), a transformers BertForMaskedLM or a causal LM (GPT2LMHeadModel, ...)")


def default_generator(device: torch.device) -> torch.Generator:
    """torch's global generator of `device` (what torch.manual_seed seeds): the draws a user's loop makes anyway."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    # a device without a global generator object (MPS): one seeded from the CPU's, on the host, no device sync
    return torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,))))


class _Drawn(Selection):
    """The step's Selection, drawing from the caller's generator in place of the run's (seed, step) stream."""

    drawn: torch.Generator

    def generator(self, step: int) -> torch.Generator:
        return self.drawn


def check_arguments(core: nn.Module, exit_layer: int, frac: float, criterion: str) -> None:
    if not 0 < frac <= 1:
        raise ValueError(f"frac={frac} is outside (0, 1]; use e.g. frac=0.5 (frac=1 keeps every row)")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not allowed; choose one of: {', '.join(CRITERIA)}")
    if not 1 <= exit_layer <= core.depth:
        raise ValueError(f"exit_layer={exit_layer} is outside this {type(core).__name__}'s blocks; choose "
                         f"1..{core.depth}")


def choose(model: nn.Module, batch: dict, exit_layer: int = 1, frac: float = 0.5, criterion: str = "loss",
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
    """select()'s choice before the batch is sliced: (kept row indices, every row's score or None). None when
    no scoring pass ran: frac=1 (every row, in order) and criterion=random."""
    core = adapter(model)
    check_arguments(core, exit_layer, frac, criterion)
    device = next(iter(batch.values())).device
    scored, kept = step_sizes(rows(batch), frac, "scored")
    if frac >= 1:  # vanilla never scores, as in the CLI's step
        return torch.arange(scored, device=device), None
    sel = _Drawn(frac=frac, criterion=criterion, scored=scored, kept=kept, seed=0, scope="local", device=device)
    sel.drawn = generator if generator is not None else default_generator(device)
    scores = features = None
    if criterion != "random":
        with modes_kept(core):
            scores, features = scorer(core, exit_layer, criterion)(batch)
    return sel.keep(scores, features, step=0), scores


def select(model: nn.Module, batch: dict, exit_layer: int = 1, frac: float = 0.5, criterion: str = "loss",
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict]:
    """The rows of `batch` worth a backward pass: (their indices, the sub-batch), ceil(frac * B) of the B rows.

    Scores the batch with the model's cheap pass (the first `exit_layer` blocks and the model's own head, no
    gradient, dropout off) and keeps rows by `criterion`, exactly as sift-train's step does: loss, entropy and
    gradnorm keep the highest scores; loss_proportional draws by loss rank; diverse picks far-apart rows; random
    skips scoring. Nothing is read back to the host; the model's train/eval mode and parameters are left as
    they were; the pass runs under whatever autocast the caller has entered. frac=1 runs no scoring pass and
    keeps every row.

    model: sift-train's BertMLM, CausalLM or ResNetClassifier, or a transformers BertForMaskedLM or causal LM
    (GPT2LMHeadModel, LlamaForCausalLM, ...: what AutoModelForCausalLM builds) as you built it (see ADAPTERS for
    adding a family; a causal LM is scored by the logit lens, its own final norm and LM head after block
    `exit_layer`, at every position). batch: sift-train's format, a dict of tensors with one row per sample:
    BERT {input_ids [B, L], mask_positions [B, P], mask_labels [B, P]}, exactly P masked tokens per row (a
    position and its original token; HF's labels with -100 map to it when every row has P labels, once per
    batch and with a host sync: mask_positions = (labels != -100).nonzero()[:, 1].view(B, P),
    mask_labels = labels.gather(1, mask_positions));
    decoders {input_ids [B, L + 1]}, packed windows without padding: the first L tokens the input, the last L
    their next-token targets (transformers' model(input_ids=ids, labels=ids).loss is the same mean loss);
    ResNet {images [B, C, H, W], labels [B]}.
    generator: the random draws of loss_proportional and random, on the batch's device (default: torch's global
    generator there). `sift_cli.data.order.seeded(seed, "select", step, device=device)` makes the draws of
    sift-train's step `step` under `seed=`.
    """
    keep, _ = choose(model, batch, exit_layer, frac, criterion, generator)
    return keep, take(batch, keep)
