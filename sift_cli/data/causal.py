"""Text corpora for causal language modelling: the same token folders as masked batches (sift_cli.data.text),
cut into packed windows.

Training sequence i is tokens[i*L : i*L + L + 1] of the split's flat token file, documents joined by the
tokenizer's [SEP] or end-of-text token: L inputs and, shifted by one, their L next-token targets. Consecutive
windows share one token, so every token of the file is a target exactly once per pass. A batch is `input_ids`
[B, L+1], a pure function of (seed, step, rank) (sift_cli.data.order); nothing is drawn at random but the
order, so validation is a fixed subset of windows.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor

from sift_cli.config import ConfigError
from sift_cli.data import order, resolve_workers
from sift_cli.data import text  # the corpora and their token folders
from sift_cli.data.text import TokenData


class CausalData(TokenData):
    """Packed windows of seq_len + 1 tokens from a token folder, as `input_ids` [B, seq_len + 1]."""

    task = "causal"

    def __init__(self, folder: Path, meta: dict, tokenizer, pretrained: Optional[str], *, seq_len: int, **shared):
        super().__init__(folder, meta, tokenizer, pretrained, seq_len=seq_len, span=seq_len + 1, stride=seq_len,
                         **shared)
        self.model_args = {**self.model_args, "seq_len": seq_len}  # the model's scored positions are fixed by it

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """Rank `rank`'s rows of global batch `step`: int64 input_ids [batch_size // world, L + 1]."""
        index = order.global_batch(self.num_train, batch_size, seed, step)[order.shard(batch_size, rank, world)]
        return {"input_ids": self._training(index)}

    def val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> list[dict[str, Tensor]]:
        """This rank's validation windows: every world-th of the validation subset, from the rank-th on."""
        ids = self._sequences("val", self.val_index[rank::world])
        return [{"input_ids": ids[i:i + batch_size]} for i in range(0, len(ids), batch_size)]

    def describe(self) -> str:
        known = f", known answer {self.setting}" if self.known_answer else ""
        return (f"{self.num_train:,} training and {self.num_val:,} validation windows of {self.seq_len} + 1 tokens, "
                f"vocabulary {self.vocab_size:,}{known}")


def build(corpus: text.Corpus, *, vocab_size: int = 8192, seq_len: int = 128, val_fraction: float = 0.05,
          max_val_samples: Optional[int] = 256, split_seed: int = 0, tokenizer: Optional[str] = None,
          tokenizer_sample_mb: float = 64, max_documents: Optional[int] = None, max_tokens: Optional[int] = None,
          num_workers: int | str = 2, duplicate_fraction: float = 0.0, duplicate_pool: int = 4,
          noise_fraction: float = 0.0, cache_dir: Optional[str] = None) -> CausalData:
    """The corpus's token folder (built once, shared with masked batches) served as causal windows."""
    if seq_len < 2:
        raise ConfigError(f"data.seq_len={seq_len} is not allowed; use at least 2 tokens")
    text.check_shared(val_fraction, max_val_samples, tokenizer_sample_mb, max_documents, max_tokens,
                      duplicate_fraction, duplicate_pool, noise_fraction)
    folder, meta, tok = text.token_folder(corpus, CausalData.task, vocab_size, val_fraction, split_seed, tokenizer,
                                          tokenizer_sample_mb, max_documents, max_tokens, cache_dir)
    data = CausalData(folder, meta, tok, pretrained=tokenizer, seq_len=seq_len, max_val_samples=max_val_samples,
                      split_seed=split_seed, num_workers=resolve_workers(num_workers),
                      duplicate_fraction=duplicate_fraction, duplicate_pool=duplicate_pool,
                      noise_fraction=noise_fraction)
    text.check_size(data, corpus, meta, val_fraction)
    data.known_answer  # built now, so that a bad combination fails before training starts
    return data


# --- the data choices: the corpora of sift_cli.data.text, served by `build` ------------------------------

settings = functools.partial(text.build_settings, builder=build)


@settings
def docstrings(packages: Sequence[str] = (), **common) -> CausalData:
    return build(text.docstring_corpus(packages or (), text._cache(common.get("cache_dir"))), **common)


@settings
def text_files(paths: str | Sequence[str], **common) -> CausalData:
    return build(text.text_file_corpus(paths), **common)


@settings
def hf(name: str, text_column: str = "text", config_name: Optional[str] = None, split: str = "train",
       data_files=None, streaming: bool = False, **common) -> CausalData:
    return build(text.hf_corpus(name, text_column, config_name, split, data_files, streaming), **common)
