"""SIFT inside a Hugging Face `transformers.Trainer` (`pip install 'sift-train[hf]'`: the Trainer needs accelerate).

Transformers' callbacks cannot change a step, so SiftTrainer subclasses the Trainer, as data-selection methods
do: compute_loss scores, selects and takes the loss on the kept rows, through sift_cli.api (the CLI's step's
own pieces).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Trainer

from sift_cli.api import adapter, check_arguments, choose
from sift_cli.config import SelectionConfig, check_window, step_sizes
from sift_cli.trainer import Selection, rows, take


class SiftTrainer(Trainer):
    """A Trainer that back-propagates only the rows sift_cli.select keeps: score -> select -> loss on kept rows.

    SiftTrainer(model, args, ..., exit_layer=1, frac=0.5, criterion="loss", selection_start=0.0,
    selection_end=1.0, selection_every=1): every other argument is the Trainer's. `model` as select() takes it: a
    transformers BertForMaskedLM or causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...), or sift-train's BertMLM,
    CausalLM or ResNetClassifier. The Trainer trains its adapter, which shares the model's weights: the model you
    passed is the one trained (save it with its own save_pretrained). Batches are select()'s format (see
    TrainRows). frac=1 runs no scoring pass: the Trainer's own training on every row. The random rules draw as
    sift-train's step does under seed=args.seed, so without accumulation every criterion keeps the CLI's rows.

    The selection window is the CLI's selection.start/end/every (trainer.Selection.selects): a step selects when
    state.global_step / state.max_steps lies in [selection_start, selection_end) and global_step is divisible by
    selection_every; any other step is the Trainer's own, on every row, with no scoring pass. Every process
    decides from the same global_step, so under DDP all select on the same steps.

    The loss is the mean over the kept rows of the whole accumulated batch: each micro-batch's mean over its kept
    rows, weighted by its share of them (num_items_in_batch counts kept rows), so gradient accumulation of n
    batches updates as one batch of their kept rows would, a short last batch included. Under DDP
    (Accelerate), each process keeps its own share (the CLI's trainer.selection_scope=local) and DDP averages
    the processes' gradients.

    Logged with the loss (so report_to="wandb" charts them), since the previous log: rows_scored (the rows drawn)
    and rows_kept (those back-propagated), over all processes, selected_steps (those that selected), and
    score_kept and score_dropped, the mean score of the kept and of the dropped rows (as sift-train's
    metrics.jsonl names them).
    """

    # compute_loss already divides by the accumulated batch's kept rows: the Trainer must not divide again
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module, *args, exit_layer: int = 1, frac: float = 0.5, criterion: str = "loss",
                 selection_start: float = 0.0, selection_end: float = 1.0, selection_every: int = 1, **kwargs):
        core = adapter(model)
        check_arguments(core, exit_layer, frac, criterion)
        self.window = SelectionConfig(selection_start, selection_end, selection_every)
        check_window(self.window, name="selection_{}", budget="max_steps")
        self.exit_layer, self.frac, self.criterion = exit_layer, frac, criterion
        self._scored = self._kept = self._selected = 0  # since the last log: known from shapes, no device read
        self._micro = 0  # the micro-batch's place in its accumulated batch
        self._selecting = frac < 1  # whether this step selects: decided once per step, in get_batch_samples
        self._score_sums: Optional[Tensor] = None  # (all scores, kept scores) since the last log, on the device
        super().__init__(core, *args, **kwargs)
        # the Trainer keeps only the batch keys that name parameters of the model's forward; the contract's forward
        # takes the whole batch as one dict, so that filter would drop every key
        self.args.remove_unused_columns = False

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The accumulated micro-batches and the rows they will back-propagate, the loss's denominator. The
        Trainer's own count reads `labels`, the targets before selection; kept rows are known from shapes."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._micro = 0
        step = self.state.global_step
        self._selecting = self._selection(batches[0] if batches else {}).selects(step / self.state.max_steps, step)
        self._selected += self._selecting
        return batches, sum(step_sizes(rows(b), self._frac(), "scored")[1] for b in batches)

    def _frac(self) -> float:
        """This step's share of rows kept: frac, or 1 (every row, no scoring pass) when it does not select."""
        return self.frac if self._selecting else 1.0

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[int] = None):
        keep, scores = choose(self.model, inputs, self.exit_layer, self._frac(), self.criterion, self._draws(inputs))
        self._micro += 1
        self._scored += rows(inputs)
        self._kept += len(keep)
        if scores is not None:
            sums = torch.stack([scores.sum(), scores[keep].sum()])
            self._score_sums = sums if self._score_sums is None else self._score_sums + sums
        # through `model`, the Trainer's (DDP's) wrapper, whose call is the adapter's training loss: a mean per row
        loss = model(take(inputs, keep) if len(keep) < rows(inputs) else inputs)
        if num_items_in_batch is not None:  # this micro-batch's share of the accumulated batch's kept rows
            loss = loss * (len(keep) / num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def _draws(self, batch: dict) -> torch.Generator:
        """The random draws (criterion random, loss_proportional) of sift-train's step n under the Trainer's seed,
        n counting micro-batches: without accumulation, the step number, so the rows kept are the CLI's."""
        n = self.state.global_step * self.args.gradient_accumulation_steps + self._micro
        return self._selection(batch).generator(n)

    def _selection(self, batch: dict) -> Selection:
        """The CLI step's Selection for a batch of this process: its knobs, draws and window."""
        scored, kept = step_sizes(rows(batch), self.frac, "scored") if batch else (0, 0)
        device = next(iter(batch.values())).device if batch else self.args.device
        return Selection(frac=self.frac, criterion=self.criterion, scored=scored, kept=kept, seed=self.args.seed,
                         scope="local", device=device, world=self.args.world_size, rank=self.args.process_index,
                         start=self.window.start, end=self.window.end, every=self.window.every)

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: Optional[list] = None):
        """Evaluation: the loss over every row (nothing is selected); the models return a loss, not logits."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = model(inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """A checkpoint: the Trainer saves a model that is not a PreTrainedModel (the adapter) as one safetensors
        state_dict, which refuses tensors that share memory, as tied embeddings and heads do (BERT's, GPT-2's).
        Each tied tensor after the first is saved as a copy, so every key is there and resume_from_checkpoint
        loads them all (the tie holds: equal values load into one tensor); the cost is their bytes on disk."""
        state = self.model.state_dict() if state_dict is None else state_dict
        stored, untied = set(), {}
        for name, tensor in state.items():
            where = tensor.untyped_storage().data_ptr()
            untied[name] = tensor.clone() if where in stored else tensor
            stored.add(where)
        super()._save(output_dir, untied)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._scored:  # a training log: the selection since the previous one
            sums = self._score_sums if self._score_sums is not None else torch.zeros(2, device=self.args.device)
            counts = torch.tensor([self._scored, self._kept], device=sums.device, dtype=sums.dtype)
            scored, kept, total, kept_sum = self.accelerator.reduce(torch.cat([counts, sums]), "sum").tolist()
            logs.update(rows_scored=int(scored), rows_kept=int(kept), selected_steps=self._selected)
            if self._score_sums is not None:
                logs["score_kept"] = kept_sum / kept
                if scored > kept:
                    logs["score_dropped"] = (total - kept_sum) / (scored - kept)
            self._scored = self._kept = self._selected = 0
            self._score_sums = None
        super().log(logs, start_time)


class TrainRows(Dataset):
    """sift-train's training sequences one row at a time, for a Trainer's DataLoader and its
    default_data_collator: row i is data.train_batch(i, 1, seed), so one pass holds every sequence once (masked
    ones each masked as a function of (seed, i)). `data`: sift-train's text data, masked (sift_cli.data.text,
    e.g. text_files([...])) or causal windows (sift_cli.data.causal, e.g. causal.text_files([...]))."""

    def __init__(self, data, seed: int = 0):
        self.data, self.seed = data, seed

    def __len__(self) -> int:
        return self.data.num_train

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.data.train_batch(i, 1, self.seed).items()}
