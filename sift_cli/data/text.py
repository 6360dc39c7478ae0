"""Text corpora for masked-language modelling: docstrings (offline), local text files, HF datasets.

Every corpus becomes a list of documents, split into train and validation by document with a fixed
seed, tokenised once (WordPiece trained on the training split, or a checkpoint's own tokenizer),
packed into full-length sequences (no padding, so no attention mask) and cached on disk. The
training loop then only indexes a tensor and masks it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from sift_cli.config import ConfigError, first_line

log = logging.getLogger(__name__)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def cache_root(cache_dir: Optional[str]) -> Path:
    root = Path(cache_dir or os.environ.get("SIFT_CACHE") or Path.home() / ".cache" / "sift-train")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


# --- corpora: each returns a list of documents -------------------------------------------------


def _docstrings_in(folder: Path, skip: Sequence[str] = ()) -> list[str]:
    """Docstrings of every module, class and function under `folder`, read with ast (never imported)."""
    docs = []
    for path in sorted(folder.rglob("*.py")):
        if any(part in skip for part in path.relative_to(folder).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # test fixtures with deliberate syntax errors, unreadable files
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 20:
                    docs.append(doc)
    return docs


def _cached_docs(name: str, version: str, folder: Path, cache: Path, skip: Sequence[str] = ()) -> list[str]:
    path = cache / "docstrings" / f"{name}-{version}.json"
    if path.exists():
        return json.loads(path.read_text())
    log.info("reading the docstrings of %s %s (cached afterwards in %s)", name, version, path)
    docs = _docstrings_in(folder, skip)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(docs))
    return docs


def docstring_corpus(packages: Sequence[str], cache: Path) -> list[str]:
    """Python's standard library docstrings (PSF license), plus those of the named installed packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3")
    docs = _cached_docs("python-stdlib", sys.version.split()[0], stdlib, cache, skip)
    for name in packages:
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"data.packages contains {name}, which is not an installed package")
        version = importlib.metadata.version(name) if _has_metadata(name) else "unknown"
        docs += _cached_docs(name, version, Path(list(spec.submodule_search_locations)[0]), cache)
    return docs


def _has_metadata(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def text_file_corpus(paths: Sequence[str]) -> list[str]:
    """Documents of local text files: paragraphs separated by blank lines."""
    if not paths:
        raise ConfigError("data.paths is empty; give one or more text files, e.g. data.paths=[corpus.txt]")
    docs = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.paths contains {p}, which is not a file")
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = [par.strip() for par in text.split("\n\n") if par.strip()]
        if not paragraphs:
            raise ConfigError(f"data.paths contains {p}, which holds no text")
        docs += paragraphs
    return docs


def hf_corpus(name: str, text_column: str, config_name=None, split="train", data_files=None) -> list[str]:
    """Any Hugging Face dataset: a hub name, or a local folder or files (CSV, JSON, Parquet, text)."""
    import datasets  # imported here: slow to import and needed only by this corpus

    try:
        ds = datasets.load_dataset(name, config_name, split=split, data_files=data_files)
    except Exception as err:  # datasets raises many types for a bad name, split or file
        why = first_line(err)
        raise ConfigError(f"data.name={name} could not be loaded by datasets.load_dataset: {why}") from None
    if text_column not in ds.column_names:
        raise ConfigError(
            f"data.text_column={text_column} is not a column of {name}; columns: {', '.join(ds.column_names)}"
        )
    return [t for t in ds[text_column] if isinstance(t, str) and t.strip()]


# --- tokenizer and packing ---------------------------------------------------------------------


def train_wordpiece(docs: Sequence[str], vocab_size: int, path: Path) -> PreTrainedTokenizerFast:
    if not path.exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        tok = BertWordPieceTokenizer(lowercase=False)
        tok.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                show_progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def pack(docs: Sequence[str], tokenizer, seq_len: int) -> Tensor:
    """[CLS] body [SEP] rows of exactly seq_len tokens; documents are joined by [SEP]."""
    ids = tokenizer(list(docs), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    flat = torch.tensor([t for doc in ids for t in doc + [tokenizer.sep_token_id]], dtype=torch.long)
    body = seq_len - 2
    n = len(flat) // body
    rows = flat[: n * body].view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, rows, sep], dim=1)


class TextData:
    """Packed token ids, masked per batch with transformers' MLM collator (15%, 80/10/10)."""

    task = "mlm"

    def __init__(self, train_ids: Tensor, val_ids: Tensor, tokenizer, mlm_probability: float, mask_seed: int):
        if len(train_ids) == 0 or len(val_ids) == 0:
            raise ConfigError(
                f"the corpus gives {len(train_ids)} training and {len(val_ids)} validation sequences; "
                "use more text, a shorter data.seq_len or a larger data.val_fraction"
            )
        self.train_ids, self.val_ids, self.tokenizer = train_ids, val_ids, tokenizer
        self.mlm_probability, self.num_train = mlm_probability, len(train_ids)
        self.special = torch.tensor(tokenizer.all_special_ids)
        self.model_args = {"vocab_size": len(tokenizer)}
        # validation is masked once, with its own seed, so every run scores the same masked tokens
        self._val = self._mask(val_ids, self._collator(mask_seed))

    def _collator(self, seed: int) -> DataCollatorForLanguageModeling:
        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability)
        # torch_mask_tokens draws from collator.generator; seeding it here, rather than through the
        # collator's `seed`, is the same in every transformers release that has it
        collator.generator = torch.Generator().manual_seed(seed)
        return collator

    def _mask(self, ids: Tensor, collator) -> dict[str, Tensor]:
        inputs, labels = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, self.special))
        return {"input_ids": inputs, "labels": labels}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Endless shuffled epochs of full batches, masked afresh each time."""
        order, collator = torch.Generator().manual_seed(seed), self._collator(seed)
        while True:
            perm = torch.randperm(len(self.train_ids), generator=order)
            for start in range(0, len(perm) - batch_size + 1, batch_size):
                yield self._mask(self.train_ids[perm[start:start + batch_size]], collator)

    def val_batches(self, batch_size: int) -> list[dict[str, Tensor]]:
        n = len(self.val_ids)
        return [{k: v[i:i + batch_size] for k, v in self._val.items()} for i in range(0, n, batch_size)]

    def describe(self) -> str:
        return (f"{len(self.train_ids):,} training and {len(self.val_ids):,} validation sequences of "
                f"{self.train_ids.shape[1]} tokens, vocabulary {len(self.tokenizer):,}")


def build(docs: list[str], corpus: str, vocab_size: int, seq_len: int, val_fraction: float,
          max_val_samples: int, split_seed: int, mlm_probability: float, tokenizer: Optional[str],
          cache_dir: Optional[str]) -> TextData:
    """Split by document, tokenise and pack once; the result is cached by content."""
    if not docs:
        raise ConfigError(f"the {corpus} corpus holds no text")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
    if seq_len < 8:
        raise ConfigError(f"data.seq_len={seq_len} is too short; use at least 8 tokens")
    cache = cache_root(cache_dir)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_val = max(1, int(len(docs) * val_fraction))
    val_docs, train_docs = [docs[i] for i in perm[:n_val]], [docs[i] for i in perm[n_val:]]
    key = _digest(hashlib.sha256("\x00".join(docs).encode()).hexdigest(), vocab_size, seq_len, val_fraction,
                  split_seed, tokenizer)
    if tokenizer:  # continued pre-training keeps the checkpoint's vocabulary
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as err:  # transformers raises OSError, ValueError, JSON errors, ...
            raise ConfigError(f"model.pretrained={tokenizer} could not be loaded as a tokenizer "
                              f"(a save_pretrained folder or a hub name): {first_line(err)}") from None
    else:
        tok = train_wordpiece(train_docs, vocab_size, cache / "tokenizers" / f"{key}.json")
    packed = cache / "packed" / f"{key}.pt"
    if packed.exists():
        train_ids, val_ids = torch.load(packed)
    else:
        train_ids, val_ids = pack(train_docs, tok, seq_len), pack(val_docs, tok, seq_len)
        packed.parent.mkdir(parents=True, exist_ok=True)
        torch.save((train_ids, val_ids), packed)
    return TextData(train_ids, val_ids[:max_val_samples], tok, mlm_probability, mask_seed=split_seed)


def docstrings(packages: Sequence[str] = (), **common) -> TextData:
    return build(docstring_corpus(packages, cache_root(common.get("cache_dir"))), "docstrings", **common)


def text_files(paths: Sequence[str], **common) -> TextData:
    return build(text_file_corpus(paths), "text_files", **common)


def hf(name: str, text_column: str = "text", config_name=None, split="train", data_files=None, **common) -> TextData:
    return build(hf_corpus(name, text_column, config_name, split, data_files), f"hf:{name}", **common)
