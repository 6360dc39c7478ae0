"""Text corpora for masked-language modelling: documents in, masked batches of fixed shape out.

A corpus (Python docstrings, local text files, any `datasets` source) is a stream of documents, read
once, document by document. Each document goes to training or validation by a hash of its
whitespace-normalised text, is tokenised in batches and appended to its split's flat token file
(documents separated by [SEP], in the smallest integer type that holds the vocabulary). That folder
is cached by the corpus's content and the settings, built by one process under a file lock and
renamed into place only when complete, so every run and every rank of a sweep shares it and memory
stays bounded whatever the corpus size.

Training sequence i is [CLS] + tokens[i*(L-2):(i+1)*(L-2)] + [SEP], read from the memory-mapped
file (so seq_len is not part of the cache key). A batch is a pure function of (seed, step, rank)
(sift_cli.data.order), masked like the original BERT recipe: a fixed number P of positions per row,
80% [MASK], 10% a random token, 10% unchanged. The same token folders serve causal language
modelling (sift_cli.data.causal): TokenData reads them, each task's batch maker shapes the batches.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sift_cli.config import ConfigError, first_line
from sift_cli.data import cache_root, check_known_answer, make_known_answer, order, resolve_workers

log = logging.getLogger(__name__)
T = TypeVar("T")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FORMAT = 1              # the token folder's layout: bump it to invalidate every cached folder
WORDPIECE = 2           # how a vocabulary is trained: 2 since it is a function of the text (train_wordpiece)
LIMIT_ALPHABET = 1000   # the characters a trained vocabulary keeps, the most frequent (tokenizers' default)
BATCH_BYTES = 1 << 20   # text per tokeniser call (characters): enough for its threads, little enough to bound memory
VAL_BLOCK = 1024        # validation sequences masked by one generator


# --- corpora: named, re-readable streams of documents --------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A stream of documents that can be read again, with the content key its cache is named by."""

    name: str                         # for messages: "data.paths=[a.txt]", "data.name=wikitext", ...
    kind: str                         # the cache folder's prefix: docstrings, text_files, hf
    key: tuple                        # changes whenever the documents may have changed
    read: Callable[[], Iterator[str]]
    size: Optional[int] = None        # bytes, where known before reading (for the progress bar)

    def __iter__(self) -> Iterator[str]:
        return self.read()


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


def _load_json_list(path: Path) -> list:
    docs = json.loads(path.read_text())
    if not isinstance(docs, list):
        raise ValueError(f"{path.name} holds a {type(docs).__name__}, not a list")
    return docs


def _cached_docs(name: str, version: str, folder: Path, cache: Path, skip: Sequence[str] = ()) -> list[str]:
    path = cache / "docstrings" / f"{name}-{version}-py{sys.version_info[0]}.{sys.version_info[1]}.json"

    def build(tmp: Path) -> None:
        log.info("reading the docstrings of %s %s (cached in %s)", name, version, path)
        tmp.write_text(json.dumps(_docstrings_in(folder, skip)))

    return cached(path, _load_json_list, build)


def docstring_corpus(packages: Sequence[str], cache: Path) -> Corpus:
    """Python's standard library docstrings (PSF license), plus those of the named installed packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3")
    sources = [("python-stdlib", sys.version.split()[0], stdlib, skip)]
    for name in packages:
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"data.packages contains {name}, which is not an installed package")
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        sources.append((name, version, Path(list(spec.submodule_search_locations)[0]), ()))

    def read() -> Iterator[str]:
        for name, version, folder, skip_parts in sources:
            yield from _cached_docs(name, version, folder, cache, skip_parts)

    key = (sys.version.split()[0], *[(name, version) for name, version, _, _ in sources])
    return Corpus(f"data.packages={list(packages)}", "docstrings", key, read)


def _paragraphs(path: Path) -> Iterator[str]:
    """Blank-line separated paragraphs of a text file, read line by line."""
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip()
                lines = []
    if lines:
        yield "".join(lines).strip()


GLOB_CHARACTERS = frozenset("*?[")


def _files_of(entry: str) -> list[Path]:
    """The files one entry of data.paths names: a file; a folder's files, recursively, by sorted path, hidden
    ones (a name starting with '.', e.g. .git/) left out; or a glob's matches (** for any depth), each match a
    file or a folder as above, by sorted path."""
    path = Path(entry).expanduser()
    if GLOB_CHARACTERS & set(entry):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        if not matches:
            raise ConfigError(f"data.paths contains {entry}, which matches no file")
        return [f for m in matches for f in _files_of(str(m))]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise ConfigError(f"data.paths contains {entry}, a folder that holds no files")
        return files
    if not path.is_file():
        raise ConfigError(f"data.paths contains {entry}, which is not a file, folder or glob that matches files")
    return [path]


def text_file_corpus(paths: str | Sequence[str]) -> Corpus:
    """Documents of local text files: paragraphs separated by blank lines. Each entry of `paths` is a file, a
    folder (its files, recursively) or a glob, read in the order given, each folder's and glob's files by
    sorted path. An empty file among others is a warning; no text at all is a refusal."""
    paths = [paths] if isinstance(paths, str) else list(paths or ())  # data.paths=README.md is one file
    if not paths:
        raise ConfigError("data.paths is empty; give one or more text files, e.g. data.paths=[corpus.txt]")
    files = []
    for path in (f for p in paths for f in _files_of(str(p))):
        if not os.access(path, os.R_OK):
            raise ConfigError(f"data.paths contains {path}, which is not readable (permission denied)")
        files.append(path.resolve())
    files = list(dict.fromkeys(files))  # a file named twice (by a folder and a glob, say) is read once

    def read() -> Iterator[str]:
        empty = []
        for path in files:
            count = 0
            for count, paragraph in enumerate(_paragraphs(path), 1):
                yield paragraph
            if not count:
                empty.append(path)
        if len(empty) == len(files):
            raise ConfigError(f"data.paths contains {paths[0]}, which holds no text" if len(files) == 1 else
                              f"data.paths={paths}: none of its {len(files)} files holds text")
        if empty:
            warnings.warn(f"data.paths: {len(empty)} of {len(files)} files hold no text and are skipped: "
                          f"{', '.join(map(str, empty[:3]))}{', ...' if len(empty) > 3 else ''}")

    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return Corpus(f"data.paths={paths}", "text_files", tuple(stats), read, size=sum(s for _, s, _ in stats))


def _plain(value):
    """Hydra's ListConfig / DictConfig as the lists and dicts that `datasets` expects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def _local_files(name: str, data_files) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the local files a `datasets` source reads; a pattern matching nothing is an error."""
    base = Path(name).expanduser()
    if data_files is None:
        if not base.is_dir():
            return []  # a hub name: its name, config and split are its key
        found = [p for p in sorted(base.rglob("*"))  # datasets skips hidden files and folders too
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)]
    else:
        patterns = data_files.values() if isinstance(data_files, dict) else [data_files]
        found = []
        for pattern in itertools.chain.from_iterable([p] if isinstance(p, str) else p for p in patterns):
            if "://" in pattern:
                continue  # remote files: keyed by their address
            full = Path(pattern).expanduser()
            full = full if full.is_absolute() or not base.is_dir() else base / full
            matches = sorted(glob.glob(str(full), recursive=True))
            if not matches:
                raise ConfigError(f"data.data_files contains {pattern}, which matches no file"
                                  + (f" under data.name={name}" if base.is_dir() else ""))
            found += [Path(m) for m in matches if Path(m).is_file()]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in found]


def hf_corpus(name: str, text_column: str = "text", config_name: Optional[str] = None, split: str = "train",
              data_files=None, streaming: bool = False) -> Corpus:
    """Any `datasets` source: a hub name (C4, Wikipedia, FineWeb), a local folder, or local shards
    (data_files: JSON, Parquet, CSV, text; globs allowed), read batch by batch, optionally streamed."""
    data_files = _plain(data_files)
    files = _local_files(name, data_files)
    where = f"data.name={name}"

    def read() -> Iterator[str]:
        import datasets  # imported here: slow to import and needed only by this corpus

        try:
            ds = datasets.load_dataset(name, config_name, split=split, data_files=data_files, streaming=streaming)
            batches = ds.iter(batch_size=1000)
            first = next(batches, None)
        except Exception as err:  # datasets raises many types for a bad name, split or file
            raise ConfigError(f"{where} could not be loaded by datasets.load_dataset: {first_line(err)}") from None
        if first is None:
            return
        if text_column not in first:
            raise ConfigError(f"data.text_column={text_column} is not a column of {name}; "
                              f"columns: {', '.join(first)}")
        for batch in itertools.chain([first], batches):
            yield from (t for t in batch[text_column] if isinstance(t, str))

    key = (name, config_name, split, repr(data_files), tuple(files), text_column, bool(streaming))
    return Corpus(where, "hf", key, read)


# --- the split, the tokenizer and the token folder -----------------------------------------------


def _split_stream(corpus: Corpus, split_seed: int, val_fraction: float,
                  max_documents: Optional[int]) -> Iterator[tuple[str, bool, int]]:
    """(text, goes to validation, its size in bytes) for each non-empty document, at most max_documents.

    A document goes to validation by a hash of its text with runs of whitespace collapsed, so the
    split is the same whatever order the documents arrive in, and copies that differ only in layout
    always land on the same side (validation text never leaks into training).
    """
    documents = 0
    for text in corpus:
        normalised = " ".join(text.split()).encode()
        if not normalised:
            continue
        digest = hashlib.blake2b(normalised, digest_size=8, key=f"split-{split_seed}".encode()).digest()
        yield text, int.from_bytes(digest, "little") < val_fraction * 2**64, len(text.encode())
        documents += 1
        if documents == max_documents:
            return


def _tokenizer_sample(stream: Iterator[tuple[str, bool, int]], megabytes: float) -> Iterator[str]:
    """The first `megabytes` of training text: what the WordPiece tokenizer is trained on."""
    used = 0
    for text, to_val, size in stream:
        if used >= megabytes * 1e6:
            return
        if not to_val:
            used += size
            yield text


def train_wordpiece(docs: Iterable[str], vocab_size: int, path: Path) -> PreTrainedTokenizerFast:
    """A cased WordPiece tokenizer trained on `docs`, saved as `path` (a tokenizer.json). The same text gives
    the same vocabulary, id for id, on any machine and with any number of threads.

    tokenizers' trainer alone does not: it numbers the continuing pieces (`##e`) in hash-map order and breaks
    ties between merges by those numbers (huggingface/tokenizers#1794; the fix, PR #2066, is unreleased), and
    it cuts the alphabet to the most frequent characters with ties unordered. So a first pass (tokenizers'
    word-level trainer, which splits text as the WordPiece one does) finds the words and counts the characters;
    the alphabet is cut with ties broken by character and given to the trainer as its initial alphabet, and
    the continuing pieces are numbered in character order by giving them to the trainer ahead of the merges, as
    leading tokens (its special tokens: they are ordinary word pieces, so they are not special afterwards).
    """
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.implementations import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=False)
    sample, chars = [], Counter()

    def read() -> Iterator[str]:  # the documents kept for the second pass, their characters counted
        for doc in docs:
            sample.append(doc)
            chars.update(tok.normalizer.normalize_str(doc))
            yield doc

    words = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[1]))
    words.normalizer, words.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    words.train_from_iterator(read(), trainers.WordLevelTrainer(vocab_size=2**31 - 1, show_progress=False))
    continuing = set(itertools.chain.from_iterable(word[1:] for word in words.get_vocab()))
    alphabet = sorted(sorted((c for c in chars if not c.isspace()), key=lambda c: (-chars[c], c))[:LIMIT_ALPHABET])
    pieces = [f"##{c}" for c in alphabet if c in continuing]
    tok.train_from_iterator(sample, vocab_size=vocab_size, min_frequency=2, limit_alphabet=len(alphabet),
                            initial_alphabet=alphabet, special_tokens=SPECIAL_TOKENS + pieces, show_progress=False)
    saved = json.loads(tok.to_str())
    saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
    return _load_wordpiece(path)


def _load_wordpiece(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def separator(tok) -> Optional[int]:
    """The token between documents in the token files: [SEP] (BERT, our WordPiece), else end-of-text (GPT-2, Llama)."""
    return tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id


def _load_pretrained(name: str, task: str = "mlm"):
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # transformers raises OSError, ValueError, JSON errors, ...
        raise ConfigError(f"model.pretrained={name} could not be loaded as a tokenizer "
                          f"(a save_pretrained folder or a hub name): {first_line(err)}") from None
    if task == "mlm" and None in (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id):
        raise ConfigError(f"model.pretrained={name} has a tokenizer without [CLS], [SEP] or [MASK] tokens; "
                          "masked-language modelling needs all three (a BERT-style checkpoint)")
    if separator(tok) is None:
        raise ConfigError(f"model.pretrained={name} has a tokenizer without a [SEP] or end-of-text token, which the "
                          "token files need between documents")
    return tok


def _tokenizer_content(tok) -> str:
    """A digest of what the tokenizer does (vocabulary, normaliser, ...), whatever path it came from."""
    backend = getattr(tok, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{type(tok).__name__}\n{content}".encode()).hexdigest()[:16]


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _not_writable(path, err: OSError) -> ConfigError:
    return ConfigError(f"the data cache {path} is not writable ({err.strerror}); "
                       "set data.cache_dir or $SIFT_CACHE to a writable folder")


def _cache(cache_dir: Optional[str]) -> Path:
    try:
        return cache_root(cache_dir)
    except OSError as err:  # permissions, or a read-only file system
        raise _not_writable(err.filename, err) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cached(path: Path, load: Callable[[Path], T], build: Callable[[Path], None]) -> T:
    """`load(path)`, building `path` first when it is missing or fails to load.

    Exactly one process builds (a file lock beside it; the others wait, then load). `build` writes a
    temporary path that is renamed into place when complete, so an interrupted build is never used;
    a cache that fails to load (truncated, corrupt) is reported and rebuilt.
    """
    broken = False
    if path.exists():
        try:
            return load(path)
        except Exception as err:  # whatever the failure, the remedy is a rebuild
            log.warning("the cache %s does not load (%s); rebuilding it", path, first_line(err))
            broken = True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.parent / f"{path.name}.lock"))
        lock.acquire()
    except OSError as err:  # permissions, or a read-only file system
        raise _not_writable(err.filename or path.parent, err) from None
    try:
        if path.exists() and not broken:  # another process built it while this one waited
            try:
                return load(path)
            except Exception as err:
                log.warning("the cache %s does not load (%s); rebuilding it", path, first_line(err))
        _remove(path)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            _remove(stale)  # left by an interrupted build: with the lock held, nobody is writing it
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            _remove(tmp)
        return load(path)
    finally:
        lock.release()


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _progress(corpus: Corpus):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("tokenising {task.description}"), BarColumn(),
                    TextColumn("{task.fields[docs]:,} documents, {task.fields[tokens]:,} tokens"),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _encoder(tok) -> Callable[[list[str]], list[list[int]]]:
    """The tokenizer's batch call, without special tokens. A fast tokenizer's Rust batch call is used
    directly: transformers' per-document wrapper around it costs a quarter of the time here."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    backend.no_truncation()  # a saved tokenizer may carry a max_length; transformers resets it per call
    backend.no_padding()
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _pieces(stream: Iterator[tuple[str, bool, int]]) -> Iterator[tuple[str, bool, int, bool]]:
    """(piece, goes to validation, bytes, ends its document): documents longer than BATCH_BYTES cut
    just before a space or newline, so a single huge document (a generated 4 MB source file) never
    sits in memory as one list of token ids. The tokenizers split words at whitespace and drop it
    (WordPiece) or keep it with the word after (byte-level BPE), so the pieces give the same tokens."""
    for text, to_val, size in stream:
        start = 0
        while len(text) - start > BATCH_BYTES:
            cut = max(text.rfind(" ", start + 1, start + BATCH_BYTES), text.rfind("\n", start + 1, start + BATCH_BYTES))
            cut = cut if cut > start else start + BATCH_BYTES  # a megabyte without whitespace: cut anyway
            yield text[start:cut], to_val, 0, False
            start = cut
        yield text[start:], to_val, size, True


def _write_tokens(folder: Path, corpus: Corpus, tok, split_seed: int, val_fraction: float,
                  max_documents: Optional[int], max_tokens: Optional[int]) -> dict:
    """Tokenise the corpus into folder/train.bin and folder/val.bin; returns their description."""
    dtype, sep, encode = _dtype(len(tok)), separator(tok), _encoder(tok)
    pieces = _pieces(_split_stream(corpus, split_seed, val_fraction, max_documents))
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in ("train", "val")}
    total, start = 0, time.perf_counter()
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val, \
            _progress(corpus) as progress:
        bar = progress.add_task(corpus.name, total=corpus.size, docs=0, tokens=0)
        while max_tokens is None or total < max_tokens:
            batch, size = [], 0
            for piece in pieces:
                batch.append(piece)
                size += len(piece[0])
                if size >= BATCH_BYTES:
                    break
            if not batch:
                break
            ids = encode([text for text, _, _, _ in batch])
            ends = np.fromiter((end for *_, end in batch), bool, len(batch))
            lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids)) + ends  # [SEP] after each document
            if max_tokens is not None and total + lengths.sum() >= max_tokens:
                keep = int(np.searchsorted(total + np.cumsum(lengths), max_tokens)) + 1
                batch, ids, lengths, ends = batch[:keep], ids[:keep], lengths[:keep], ends[:keep]
                # the cap falls inside the last document: it ends there, with its [SEP] as the last token
                lengths[-1] = max_tokens - total - lengths[:-1].sum()
                ids[-1], ends[-1] = ids[-1][:lengths[-1] - 1], True
            for split, file in (("train", train), ("val", val)):
                chosen = [i for i, (_, to_val, _, _) in enumerate(batch) if to_val == (split == "val")]
                n_tokens = int(lengths[chosen].sum())
                flat = itertools.chain.from_iterable(ids[i] + [sep] if ends[i] else ids[i] for i in chosen)
                file.write(np.fromiter(flat, dtype, n_tokens).tobytes())
                c = counts[split]
                c["documents"] += int(ends[chosen].sum())
                c["tokens"] += n_tokens
                c["bytes"] += sum(batch[i][2] for i in chosen)
            total += int(lengths.sum())
            progress.update(bar, advance=sum(n for _, _, n, _ in batch), tokens=total,
                            docs=counts["train"]["documents"] + counts["val"]["documents"])
    seconds = time.perf_counter() - start
    megabytes = (counts["train"]["bytes"] + counts["val"]["bytes"]) / 1e6
    documents = counts["train"]["documents"] + counts["val"]["documents"]
    log.info("tokenised %s: %s documents, %s tokens, %.0f MB in %.0f s (%.1f MB/s)", corpus.name,
             f"{documents:,}", f"{total:,}", megabytes, seconds, megabytes / max(seconds, 1e-9))
    return {"dtype": dtype.name, **counts}


def _load_tokens(folder: Path, trained: bool) -> tuple[dict, Optional[PreTrainedTokenizerFast]]:
    meta = json.loads((folder / "meta.json").read_text())
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        size, expected = (folder / f"{split}.bin").stat().st_size, meta[split]["tokens"] * itemsize
        if size != expected:
            raise ValueError(f"{split}.bin holds {size:,} bytes, not {expected:,}")
    return meta, _load_wordpiece(folder / "tokenizer.json") if trained else None


# --- the token files, read by each task's batch maker ------------------------------------------------


class TokenData:
    """A token folder's training and validation sequences: sequence i reads `span` tokens from i*stride on.
    Each task's batch maker (TextData here, causal.CausalData) turns them into its batches."""

    task: str
    text = slice(None)  # the part of a sequence that holds text (what noise_fraction replaces)

    def __init__(self, folder: Path, meta: dict, tokenizer, pretrained: Optional[str], *, seq_len: int, span: int,
                 stride: int, max_val_samples: Optional[int], split_seed: int, num_workers: int,
                 duplicate_fraction: float, duplicate_pool: int, noise_fraction: float):
        self.folder, self.meta, self.seq_len, self.split_seed = Path(folder), meta, seq_len, split_seed
        self.span, self.stride = span, stride
        self._tokenizer, self._pretrained = tokenizer, pretrained
        self.num_workers = num_workers
        self.num_train = self._count(meta["train"]["tokens"])
        self.val_index = torch.tensor(order.validation_subset(range(self._count(meta["val"]["tokens"])),
                                                              max_val_samples, split_seed), dtype=torch.long)
        self.num_val = len(self.val_index)
        self.vocab_size = len(tokenizer)
        self.model_args = {"vocab_size": self.vocab_size}
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.setting = {"duplicate_fraction": duplicate_fraction, "duplicate_pool": duplicate_pool,
                        "noise_fraction": noise_fraction}
        self._known: Optional[order.KnownAnswer] = None
        self._mmaps: dict[str, np.memmap] = {}
        # what the tokens mean: tokenizers trained apart (caches not shared) can number a vocabulary differently.
        # The vocabulary alone: building the cache turns a loaded tokenizer's truncation and padding off
        self.fingerprint = _digest(sorted(tokenizer.get_vocab().items()), meta)

    # -- pickled cheaply for DataLoader workers: paths and numbers, no memory map, no tokenizer
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mmaps": {}, "_tokenizer": None, "_known": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = (_load_pretrained(self._pretrained, self.task) if self._pretrained
                               else _load_wordpiece(self.folder / "tokenizer.json"))
        return self._tokenizer

    @property
    def known_answer(self) -> Optional[order.KnownAnswer]:
        """The duplicated and noisy training samples, or None when the data is used as it is."""
        s = self.setting
        if self._known is None and (s["duplicate_fraction"] or s["noise_fraction"]):
            self._known = make_known_answer(self.num_train, s["duplicate_fraction"], s["duplicate_pool"],
                                            s["noise_fraction"], self.split_seed, "sequences")
        return self._known

    def _count(self, tokens: int) -> int:
        return max(tokens - self.span + self.stride, 0) // self.stride

    def _sequences(self, split: str, index: Tensor) -> Tensor:
        """Tokens [i*stride, i*stride + span) for each i in `index`, as int64 [len(index), span]."""
        if split not in self._mmaps:
            self._mmaps[split] = np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        offsets = index.numpy()[:, None] * self.stride + np.arange(self.span)
        return torch.from_numpy(self._mmaps[split][offsets].astype(np.int64))  # reads only these tokens

    def _ordinary_ids(self) -> Tensor:
        vocab = torch.arange(self.vocab_size)
        return vocab[~torch.isin(vocab, self.special_ids)]

    def _training(self, index: Tensor) -> Tensor:
        """Training sequences `index`, changed as the known-answer options say: a duplicate shows its source's
        content, a noisy one random ordinary tokens in its text (fixed by its index)."""
        known = self.known_answer
        if known is None:
            return self._sequences("train", index)
        source, noisy = known(index)
        ids = self._sequences("train", source)
        ordinary = self._ordinary_ids()
        for row in noisy.nonzero().flatten().tolist():  # few rows; each fixed by its sample index
            g = order.seeded(self.split_seed, "noise", int(index[row]))
            text = ids[row, self.text]
            ids[row, self.text] = ordinary[torch.randint(len(ordinary), text.shape, generator=g)]
        return ids


# --- masked batches -------------------------------------------------------------------------------


class TextData(TokenData):
    """Packed training and validation sequences on disk, masked per batch as a pure function of its arguments."""

    task = "mlm"
    text = slice(1, -1)

    def __init__(self, folder: Path, meta: dict, tokenizer, pretrained: Optional[str], *, seq_len: int,
                 mlm_probability: float, max_predictions: int, **shared):
        super().__init__(folder, meta, tokenizer, pretrained, seq_len=seq_len, span=seq_len - 2, stride=seq_len - 2,
                         **shared)
        self.num_masked = min(round(mlm_probability * (seq_len - 2)), max_predictions)
        self.cls_id, self.sep_id, self.mask_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id

    def _sequences(self, split: str, index: Tensor) -> Tensor:
        """[CLS] + tokens[i*(L-2):(i+1)*(L-2)] + [SEP] for each i in `index`, as int64 [len(index), L]."""
        ids = torch.empty(len(index), self.seq_len, dtype=torch.long)
        ids[:, 0], ids[:, -1] = self.cls_id, self.sep_id
        ids[:, self.text] = super()._sequences(split, index)
        return ids

    def _mask(self, ids: Tensor, generator: torch.Generator, total: int, rows) -> dict[str, Tensor]:
        """Mask exactly P positions of each row. The random draws are made for all `total` rows of the
        global batch and then sliced to `rows`, so a row is masked alike whatever the number of ranks."""
        length, p = self.seq_len, self.num_masked
        keys = torch.rand(total, length, generator=generator)[rows]
        choice = torch.rand(total, p, generator=generator)[rows]
        ordinary = self._ordinary_ids()
        random_ids = ordinary[torch.randint(len(ordinary), (total, p), generator=generator)[rows]]
        special = torch.isin(ids, self.special_ids)
        # special positions sort below every ordinary one; a row with fewer than P ordinary tokens
        # (a run of tiny documents) picks some of them too, and they stay unchanged as their own labels
        positions = keys.masked_fill(special, -1.0).topk(p, dim=1).indices.sort(dim=1).values
        labels = ids.gather(1, positions)
        new = torch.where(choice < 0.8, self.mask_id, torch.where(choice < 0.9, random_ids, labels))
        new = torch.where(special.gather(1, positions), labels, new)
        return {"input_ids": ids.scatter(1, positions, new), "mask_positions": positions, "mask_labels": labels}

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """Rank `rank`'s rows of global batch `step`: int64 input_ids [b, L], mask_positions and
        mask_labels [b, P], b = batch_size // world. The same arguments always give the same tensors."""
        rows = order.shard(batch_size, rank, world)
        index = order.global_batch(self.num_train, batch_size, seed, step)[rows]
        return self._mask(self._training(index), order.seeded(seed, "mask", step), batch_size, rows)

    def val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> list[dict[str, Tensor]]:
        """This rank's validation sequences (every world-th of the validation subset, from the rank-th on), masked
        once with split_seed, so every run and every world size scores the same masked tokens."""
        index = self.val_index[rank::world]
        if not len(index):
            return []
        # masked in blocks of VAL_BLOCK sequences, each with its own seed: a sequence's mask depends on
        # its index alone, not on max_val_samples, and no draw is larger than one block
        blocks = []
        for block in (index // VAL_BLOCK).unique().tolist():
            part = index[index // VAL_BLOCK == block]
            blocks.append(self._mask(self._sequences("val", part), order.seeded(self.split_seed, "val-mask", block),
                                     VAL_BLOCK, part % VAL_BLOCK))
        masked = {k: torch.cat([b[k] for b in blocks]) for k in ("input_ids", "mask_positions", "mask_labels")}
        return [{k: v[i:i + batch_size] for k, v in masked.items()} for i in range(0, len(index), batch_size)]

    def describe(self) -> str:
        known = f", known answer {self.setting}" if self.known_answer else ""
        return (f"{self.num_train:,} training and {self.num_val:,} validation sequences of {self.seq_len} tokens "
                f"({self.num_masked} masked), vocabulary {self.vocab_size:,}{known}")


# --- the builders: Hydra targets whose keyword arguments are the YAML keys ------------------------


def _fail(key, value, allowed):
    raise ConfigError(f"data.{key}={value} is not allowed; {allowed}")


def _check(seq_len, mlm_probability, max_predictions) -> None:
    if seq_len < 8:
        _fail("seq_len", seq_len, "use at least 8 tokens")
    if not 0 < mlm_probability < 1:
        _fail("mlm_probability", mlm_probability, "use a fraction in (0, 1), e.g. 0.15")
    if max_predictions < 1 or round(mlm_probability * (seq_len - 2)) < 1:
        _fail("max_predictions" if max_predictions < 1 else "mlm_probability",
              max_predictions if max_predictions < 1 else mlm_probability,
              "each sequence needs at least one masked position")


def check_shared(val_fraction, max_val_samples, tokenizer_sample_mb, max_documents, max_tokens, duplicate_fraction,
                 duplicate_pool, noise_fraction) -> None:
    """The keys of every task's text data."""
    if not 0 < val_fraction < 1:
        _fail("val_fraction", val_fraction, "use a fraction in (0, 1), e.g. 0.05")
    if max_val_samples is not None and max_val_samples < 1:
        _fail("max_val_samples", max_val_samples, "use a positive number, or null for every validation sequence")
    if tokenizer_sample_mb <= 0:
        _fail("tokenizer_sample_mb", tokenizer_sample_mb, "use a positive number of MB, e.g. 64")
    for key, value in (("max_documents", max_documents), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            _fail(key, value, "use a positive number, or null for no cap")
    check_known_answer(duplicate_fraction, duplicate_pool, noise_fraction)  # what every data choice checks


def build(corpus: Corpus, *, vocab_size: int = 8192, seq_len: int = 128, val_fraction: float = 0.05,
          max_val_samples: Optional[int] = 256, split_seed: int = 0, mlm_probability: float = 0.15,
          max_predictions: int = 20, tokenizer: Optional[str] = None, tokenizer_sample_mb: float = 64,
          max_documents: Optional[int] = None, max_tokens: Optional[int] = None, num_workers: int | str = 2,
          duplicate_fraction: float = 0.0, duplicate_pool: int = 4, noise_fraction: float = 0.0,
          cache_dir: Optional[str] = None) -> TextData:
    """Tokenise the corpus into a cached token folder (once, for every run) and serve masked batches from it."""
    _check(seq_len, mlm_probability, max_predictions)
    check_shared(val_fraction, max_val_samples, tokenizer_sample_mb, max_documents, max_tokens, duplicate_fraction,
                 duplicate_pool, noise_fraction)
    folder, meta, tok = token_folder(corpus, TextData.task, vocab_size, val_fraction, split_seed, tokenizer,
                                     tokenizer_sample_mb, max_documents, max_tokens, cache_dir)
    data = TextData(folder, meta, tok, pretrained=tokenizer, seq_len=seq_len,
                    mlm_probability=mlm_probability, max_predictions=max_predictions, max_val_samples=max_val_samples,
                    split_seed=split_seed, num_workers=resolve_workers(num_workers),
                    duplicate_fraction=duplicate_fraction, duplicate_pool=duplicate_pool, noise_fraction=noise_fraction)
    check_size(data, corpus, meta, val_fraction)
    data.known_answer  # built now, so that a bad combination fails before training starts
    return data


def token_folder(corpus: Corpus, task: str, vocab_size: int, val_fraction: float, split_seed: int,
                 tokenizer: Optional[str], tokenizer_sample_mb: float, max_documents: Optional[int],
                 max_tokens: Optional[int], cache_dir: Optional[str]) -> tuple[Path, dict, PreTrainedTokenizerFast]:
    """The corpus's cached token folder, built on first use, and its tokenizer: every task reads the same one."""
    root = _cache(cache_dir)
    pretrained = _load_pretrained(tokenizer, task) if tokenizer else None
    recipe = ("pretrained", _tokenizer_content(pretrained)) if pretrained else ("wordpiece", vocab_size,
                                                                                 tokenizer_sample_mb, WORDPIECE)
    # a capped folder's key marks the exact cut (earlier versions kept up to one piece more), not FORMAT: a
    # new FORMAT would retrain every cached tokenizer
    cap = max_tokens if max_tokens is None else ("exact", max_tokens)
    key = _digest(FORMAT, corpus.key, recipe, val_fraction, split_seed, max_documents, cap)

    def make(folder: Path) -> None:
        folder.mkdir(parents=True)
        if pretrained is None:
            log.info("training a WordPiece tokenizer of %s tokens on the first %g MB of training text from %s",
                     f"{vocab_size:,}", tokenizer_sample_mb, corpus.name)
        tok = pretrained or train_wordpiece(
            _tokenizer_sample(_split_stream(corpus, split_seed, val_fraction, max_documents), tokenizer_sample_mb),
            vocab_size, folder / "tokenizer.json")
        meta = _write_tokens(folder, corpus, tok, split_seed, val_fraction, max_documents, max_tokens)
        if meta["train"]["documents"] + meta["val"]["documents"] == 0:
            raise ConfigError(f"{corpus.name} holds no text")
        (folder / "meta.json").write_text(json.dumps({"corpus": corpus.name, **meta}, indent=1))

    folder = root / "text" / f"{corpus.kind}-{key}"
    meta, trained = cached(folder, lambda f: _load_tokens(f, not pretrained), make)
    return folder, meta, pretrained or trained


def check_size(data: TokenData, corpus: Corpus, meta: dict, val_fraction: float) -> None:
    """Both splits need at least one sequence; say how much text that takes."""
    if data.num_train and data.num_val:
        return
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    text = meta["train"]["bytes"] + meta["val"]["bytes"]
    share, split, change = ((val_fraction, "validation", "larger") if not data.num_val
                            else (1 - val_fraction, "training", "smaller"))
    needed = data.span * text / max(tokens, 1) / share / 1e3
    raise ConfigError(
        f"{corpus.name} gives {data.num_train:,} training and {data.num_val:,} validation sequences of "
        f"{data.seq_len} tokens: {split} needs at least {data.span} tokens, about {needed:,.1f} KB of text "
        f"at data.val_fraction={val_fraction} (the corpus has {text / 1e3:,.1f} KB); use more text, a shorter "
        f"data.seq_len or a {change} data.val_fraction")


def build_settings(entry: Callable, builder: Optional[Callable] = None) -> Callable:
    """A text source whose **common are `builder`'s settings (default: build's), with those in its signature: the
    config checks (sift_cli.config.check_arguments) then see every key it takes and its type."""
    own = inspect.signature(entry, eval_str=True)
    shared = [p for p in inspect.signature(builder or build, eval_str=True).parameters.values()
              if p.kind == p.KEYWORD_ONLY]
    entry.__signature__ = own.replace(parameters=[p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
                                      + shared)
    return entry


@build_settings
def docstrings(packages: Sequence[str] = (), **common) -> TextData:
    return build(docstring_corpus(packages or (), _cache(common.get("cache_dir"))), **common)


@build_settings
def text_files(paths: str | Sequence[str], **common) -> TextData:
    return build(text_file_corpus(paths), **common)


@build_settings
def hf(name: str, text_column: str = "text", config_name: Optional[str] = None, split: str = "train",
       data_files=None, streaming: bool = False, **common) -> TextData:
    return build(hf_corpus(name, text_column, config_name, split, data_files, streaming), **common)
