import pickle

import numpy as np
import pytest
import torch
from transformers import GPT2TokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from sift_cli.config import ConfigError
from sift_cli.data import order
from sift_cli.data.causal import text_files
from sift_cli.data.text import text_files as masked_text_files

COMMON = dict(vocab_size=200, seq_len=16, val_fraction=0.2)


def build(path, tmp_path, **kw):
    return text_files(str(path), cache_dir=str(tmp_path / "cache"), **{**COMMON, **kw})


def flat(data, split="train") -> torch.Tensor:
    return torch.from_numpy(np.fromfile(data.folder / f"{split}.bin", dtype=data.meta["dtype"]).astype(np.int64))


def test_windows_are_packed_shifted_by_one_and_read_from_the_masked_datas_token_file(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    masked = masked_text_files(str(corpus_file), cache_dir=str(tmp_path / "cache"), **COMMON)
    assert data.folder == masked.folder and data.task == "causal"  # one token folder for both tasks
    assert data.model_args == {"vocab_size": len(data.tokenizer), "seq_len": 16}
    tokens, length = flat(data), data.seq_len
    assert data.num_train == (len(tokens) - 1) // length
    batch = data.train_batch(3, 8, seed=1)
    assert list(batch) == ["input_ids"] and batch["input_ids"].shape == (8, length + 1)
    for row, i in zip(batch["input_ids"], order.global_batch(data.num_train, 8, 1, 3).tolist()):
        assert torch.equal(row, tokens[i * length:i * length + length + 1])
    # window i's last token is window i+1's first: every token is a target exactly once per pass
    both = data._sequences("train", torch.tensor([0, 1]))
    assert both[0, -1] == both[1, 0]
    sep = data.tokenizer.sep_token_id
    assert (tokens == sep).sum() == data.meta["train"]["documents"]  # documents joined by [SEP]


def test_a_batch_is_a_pure_function_of_seed_step_and_rank_and_ranks_partition_it(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    whole = data.train_batch(4, 8, seed=2)["input_ids"]
    assert torch.equal(whole, data.train_batch(4, 8, seed=2)["input_ids"])
    assert torch.equal(whole, pickle.loads(pickle.dumps(data)).train_batch(4, 8, seed=2)["input_ids"])
    assert not torch.equal(whole, data.train_batch(5, 8, seed=2)["input_ids"])
    assert not torch.equal(whole, data.train_batch(4, 8, seed=3)["input_ids"])
    shares = [data.train_batch(4, 8, seed=2, rank=r, world=2)["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(shares), whole)


def test_validation_is_a_fixed_subset_split_over_ranks(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path, max_val_samples=5)
    assert data.num_val == 5
    tokens, length = flat(data, "val"), data.seq_len
    batches = data.val_batches(2)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    for row, i in zip(ids, data.val_index.tolist()):
        assert torch.equal(row, tokens[i * length:i * length + length + 1])
    ranks = [torch.cat([b["input_ids"] for b in data.val_batches(2, r, 2)]) for r in range(2)]
    assert sorted(map(tuple, torch.cat(ranks).tolist())) == sorted(map(tuple, ids.tolist()))


def test_known_answer_duplicates_and_noise(corpus_file, tmp_path):
    plain = build(corpus_file, tmp_path)
    data = build(corpus_file, tmp_path, duplicate_fraction=0.25, noise_fraction=0.25)
    known = data.known_answer
    assert len(known.duplicated) == round(0.25 * data.num_train) == len(known.noisy)
    every = torch.arange(data.num_train)
    ids = data._training(every)
    source = known.source
    assert torch.equal(ids[known.duplicated], plain._sequences("train", source[known.duplicated]))
    untouched = ~known.is_noisy & (source == every)
    assert torch.equal(ids[untouched], plain._sequences("train", every[untouched]))
    noisy = ids[known.noisy]
    assert not torch.equal(noisy, plain._sequences("train", known.noisy))
    assert not torch.isin(noisy, data.special_ids).any()


def gpt2_style_tokenizer(path):
    """A byte-level BPE tokenizer with GPT-2's conventions: an end-of-text token and no [SEP], [CLS] or [MASK]."""
    backend = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(range(32, 127))} | {"<|endoftext|>": 95},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    tok = GPT2TokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    tok.save_pretrained(path)
    return path


def test_a_pretrained_decoders_tokenizer_joins_documents_by_end_of_text(corpus_file, tmp_path):
    folder = gpt2_style_tokenizer(tmp_path / "gpt2")
    data = build(corpus_file, tmp_path, tokenizer=str(folder))
    tokens = flat(data)
    assert data.vocab_size == 96 and (tokens == 95).sum() == data.meta["train"]["documents"]
    with pytest.raises(ConfigError, match="has a tokenizer without \\[CLS\\], \\[SEP\\] or \\[MASK\\]"):
        masked_text_files(str(corpus_file), cache_dir=str(tmp_path / "cache"), tokenizer=str(folder), **COMMON)


def test_bad_values_name_the_key(corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len=1 is not allowed"):
        build(corpus_file, tmp_path, seq_len=1)
    with pytest.raises(ConfigError, match="data.val_fraction=1.5 is not allowed"):
        build(corpus_file, tmp_path, val_fraction=1.5)
    with pytest.raises(ConfigError, match="validation needs at least 4001 tokens"):
        build(corpus_file, tmp_path, seq_len=4000)
