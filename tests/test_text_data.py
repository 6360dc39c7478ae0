import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS, REPO
from sift_cli.config import ConfigError
from sift_cli.data import order
from sift_cli.data.text import (_cached_docs, _docstrings_in, docstring_corpus, docstrings, hf, text_file_corpus,
                                text_files)

COMMON = dict(vocab_size=200, seq_len=32, val_fraction=0.2)
PARAGRAPHS = CORPUS.split("\n\n")


def build(path, tmp_path, **kw):
    return text_files(str(path), cache_dir=str(tmp_path / "cache"), **{**COMMON, **kw})


def documents(data, split: str) -> list[tuple]:
    """The documents of a split's token file, each as a tuple of token ids."""
    tokens = np.fromfile(data.folder / f"{split}.bin", dtype=data.meta["dtype"]).tolist()
    docs, current = [], []
    for t in tokens:
        if t == data.tokenizer.sep_token_id:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert not current  # every document ends with [SEP]
    return docs


def texts(data, split: str) -> list[str]:
    """The documents of a split as text: the way to compare builds with different tokenizers."""
    return sorted(data.tokenizer.decode(doc) for doc in documents(data, split))


def unmasked(batch) -> torch.Tensor:
    return batch["input_ids"].scatter(1, batch["mask_positions"], batch["mask_labels"])


def write(path: Path, paragraphs) -> Path:
    path.write_text("\n\n".join(paragraphs))
    return path


def test_the_token_file_is_the_direct_tokenisation_and_sequence_i_is_read_by_index(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    tok = data.tokenizer
    assert data.meta["dtype"] == "uint16" and data.model_args == {"vocab_size": len(tok)} and data.task == "mlm"
    direct = [tuple(tok(p.strip(), add_special_tokens=False)["input_ids"]) for p in PARAGRAPHS]
    train, val = documents(data, "train"), documents(data, "val")
    assert len(set(direct)) == len(direct) and sorted(train + val) == sorted(direct)
    assert train == [d for d in direct if d in set(train)]  # in the order the corpus was read
    assert 0 < len(val) < len(train)

    body = data.seq_len - 2
    flat = torch.from_numpy(np.fromfile(data.folder / "train.bin", dtype=np.uint16).astype(np.int64))
    assert data.num_train == len(flat) // body
    batch = data.train_batch(5, 8, seed=3)
    index = order.global_batch(data.num_train, 8, 3, 5)
    expected = torch.stack([flat[i * body:(i + 1) * body] for i in index.tolist()])
    ids = unmasked(batch)
    assert torch.equal(ids[:, 1:-1], expected)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    for key, value in batch.items():
        assert value.dtype == torch.int64 and not value.is_pinned(), key
    assert batch["input_ids"].shape == (8, 32) and batch["mask_positions"].shape == (8, 4) == batch["mask_labels"].shape


def test_long_documents_are_tokenised_in_pieces_to_the_same_tokens(corpus_file, tmp_path, monkeypatch):
    import sift_cli.data.text as text

    build(corpus_file, tmp_path).tokenizer.save_pretrained(tmp_path / "tok")
    whole = build(corpus_file, tmp_path, tokenizer=str(tmp_path / "tok"))
    monkeypatch.setattr(text, "BATCH_BYTES", 40)  # every paragraph (about 150 characters) is cut into pieces
    pieces = build(corpus_file, tmp_path / "other", tokenizer=str(tmp_path / "tok"))
    assert pieces.folder != whole.folder  # built anew, in another cache
    for split in ("train", "val"):
        assert documents(pieces, split) == documents(whole, split)
    assert pieces.meta == whole.meta


def test_masking_picks_exactly_p_ordinary_positions_80_10_10(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path, seq_len=48)
    assert data.num_masked == round(0.15 * 46) == 7
    special = data.special_ids
    outcome = {"mask": 0, "random": 0, "same": 0}
    for step in range(40):
        batch = data.train_batch(step, 16, seed=0)
        pos, labels = batch["mask_positions"], batch["mask_labels"]
        original = unmasked(batch)
        assert (pos[:, 1:] > pos[:, :-1]).all()  # P distinct positions per row
        assert not torch.isin(labels, special).any()  # never [CLS], [SEP], ... while ordinary tokens remain
        untouched = torch.ones_like(original, dtype=torch.bool).scatter(1, pos, False)
        assert torch.equal(batch["input_ids"][untouched], original[untouched])
        now = batch["input_ids"].gather(1, pos)
        outcome["mask"] += int((now == data.mask_id).sum())
        outcome["same"] += int((now == labels).sum())
        outcome["random"] += int(((now != labels) & (now != data.mask_id)).sum())
        assert not torch.isin(now[now != data.mask_id], special).any()  # random tokens are ordinary ones
    total = sum(outcome.values())
    assert total == 40 * 16 * 7
    assert 0.76 < outcome["mask"] / total < 0.84
    assert 0.07 < outcome["random"] / total < 0.13 and 0.07 < outcome["same"] / total < 0.13

    # a row with fewer than P ordinary tokens: the extra picks are special tokens, kept as their own labels
    ids = torch.full((1, 48), data.sep_id)
    ids[0, [5, 9]] = torch.tensor([20, 21])
    few = data._mask(ids, order.seeded(0, "mask", 0), 1, slice(None))
    assert set(few["mask_labels"][0].tolist()) == {20, 21, data.sep_id} and len(few["mask_positions"][0]) == 7
    assert (few["input_ids"][ids == data.sep_id] == data.sep_id).all()


def test_a_batch_is_a_pure_function_of_step_seed_and_rank(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    batch = data.train_batch(3, 8, seed=1)
    worker = pickle.loads(pickle.dumps(data))  # as a DataLoader worker receives it (spawn)
    assert len(pickle.dumps(data)) < 20_000 and not worker._mmaps
    worker.train_batch(7, 8, seed=1)  # calls in another order change nothing
    again = worker.train_batch(3, 8, seed=1)
    halves = [data.train_batch(3, 8, seed=1, rank=r, world=2) for r in (0, 1)]
    for key in batch:
        assert torch.equal(batch[key], again[key])
        assert torch.equal(batch[key], torch.cat([h[key] for h in halves]))
        assert halves[0][key].shape[0] == 4
    assert not torch.equal(batch["input_ids"], data.train_batch(4, 8, seed=1)["input_ids"])
    assert not torch.equal(batch["input_ids"], data.train_batch(3, 8, seed=2)["input_ids"])
    state = torch.get_rng_state()
    data.train_batch(3, 8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream (dropout) is left alone


class Steps(torch.utils.data.Dataset):
    """Step s of training as a DataLoader item, the way the trainer reads batches in workers."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __getitem__(self, step):
        return self.data.train_batch(step, self.batch_size, self.seed)


def test_train_batches_from_dataloader_workers_equal_the_main_process_ones(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    assert data.num_workers == 2
    loader = torch.utils.data.DataLoader(Steps(data, 8, seed=0), batch_size=None, sampler=range(4),
                                         num_workers=data.num_workers)
    for step, batch in enumerate(loader):
        expected = data.train_batch(step, 8, seed=0)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_a_validation_subset_is_spread_over_the_whole_split_and_the_same_every_run():
    subset = order.validation_subset(range(100_000), 200, seed=0)
    assert subset == order.validation_subset(range(100_000), 200, seed=0) == sorted(set(subset))
    assert len(subset) == 200 and all(any(t * 10_000 <= i < (t + 1) * 10_000 for i in subset) for t in range(10))
    assert order.validation_subset(range(50), None, 0) == order.validation_subset(range(50), 80, 0) == list(range(50))


def test_validation_is_masked_once_and_every_sequence_is_on_exactly_one_rank(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path)
    full = {k: torch.cat([b[k] for b in data.val_batches(4)]) for k in ("input_ids", "mask_positions")}
    assert len(full["input_ids"]) == data.num_val > 4
    ranks = [{k: torch.cat([b[k] for b in data.val_batches(4, r, 2)]) for k in full} for r in (0, 1)]
    for r in (0, 1):
        for k in full:
            assert torch.equal(ranks[r][k], full[k][r::2])
    again = build(corpus_file, tmp_path).val_batches(4)  # another run, from the cache
    assert torch.equal(torch.cat([b["input_ids"] for b in again]), full["input_ids"])
    few = build(corpus_file, tmp_path, max_val_samples=3)
    [only] = few.val_batches(8)
    rows = torch.searchsorted(data.val_index, few.val_index)  # a sequence and its mask are the same in a subset
    assert torch.equal(data.val_index[rows], few.val_index)
    assert torch.equal(only["input_ids"], full["input_ids"][rows])
    assert few.val_index.tolist() != [0, 1, 2]  # drawn from the whole split, not its first sequences


def test_split_is_by_document_hash_whatever_the_order_and_never_leaks(tmp_path):
    # copies that differ only in layout, as docstrings repeated across a package are
    copies = [p.replace(" ", "   ", 2).replace(". ", ".\n") for p in PARAGRAPHS]
    forward = build(write(tmp_path / "a.txt", PARAGRAPHS + copies), tmp_path)
    backward = build(write(tmp_path / "b.txt", (PARAGRAPHS + copies)[::-1]), tmp_path)
    for split in ("train", "val"):
        assert texts(forward, split) == texts(backward, split)
    train, val = set(documents(forward, "train")), set(documents(forward, "val"))
    assert val and not train & val
    assert len(documents(forward, "val")) == 2 * len(val)  # both copies of a document went the same way


def test_an_interrupted_or_truncated_build_is_never_used(corpus_file, tmp_path, caplog):
    data = build(corpus_file, tmp_path)
    before, folder = texts(data, "train"), data.folder
    train = folder / "train.bin"
    with open(train, "r+b") as f:
        f.truncate(train.stat().st_size // 2)  # a killed copy, a full disk
    with caplog.at_level(logging.WARNING):
        again = build(corpus_file, tmp_path)
    assert "does not load (train.bin holds" in caplog.text and "rebuilding" in caplog.text
    assert texts(again, "train") == before

    shutil.rmtree(folder)
    stale = folder.with_name(f".{folder.name}.tmp-4242")  # a build killed half-way
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 10)
    again = build(corpus_file, tmp_path)
    assert not stale.exists() and texts(again, "train") == before


def _build_in_another_process(path, cache, marker, out):
    import sift_cli.data.text as text

    write_tokens = text._write_tokens

    def counted(*args, **kwargs):
        with open(marker, "a") as f:
            f.write("build\n")
        time.sleep(1.0)  # the other process arrives while this one holds the lock
        return write_tokens(*args, **kwargs)

    text._write_tokens = counted
    data = text.text_files(path, cache_dir=cache, **COMMON)
    torch.save(data.train_batch(2, 8, seed=0), out)


def test_two_processes_asking_for_one_corpus_build_it_once(corpus_file, tmp_path):
    ctx = multiprocessing.get_context("fork")
    marker, outs = tmp_path / "builds.txt", [tmp_path / "a.pt", tmp_path / "b.pt"]
    procs = [ctx.Process(target=_build_in_another_process,
                         args=(str(corpus_file), str(tmp_path / "cache"), marker, out)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert marker.read_text() == "build\n"
    a, b = (torch.load(out) for out in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # and a batch is the same in any process


def test_hf_streams_local_folders_of_json_and_parquet_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "json").mkdir()
    (tmp_path / "parquet").mkdir()
    for shard in range(10):
        rows = [{"id": i, "text": PARAGRAPHS[i]} for i in range(shard * 10, shard * 10 + 10)]
        (tmp_path / "json" / f"part-{shard:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / f"part-{shard:02d}.parquet")
    cache = str(tmp_path / "cache")
    reference = build(write(tmp_path / "c.txt", PARAGRAPHS), tmp_path)
    built = [hf(str(tmp_path / "json"), streaming=True, cache_dir=cache, **COMMON),
             hf("parquet", data_files=str(tmp_path / "parquet" / "*.parquet"), streaming=True, cache_dir=cache,
                **COMMON),
             hf(str(tmp_path / "json"), streaming=False, cache_dir=cache, **COMMON)]
    assert len({d.folder for d in built}) == 3
    for data in built:
        assert data.meta["train"]["documents"] + data.meta["val"]["documents"] == 100
        for split in ("train", "val"):
            assert texts(data, split) == texts(reference, split)

    capped = hf(str(tmp_path / "json"), streaming=True, cache_dir=cache, max_documents=30, **COMMON)
    assert capped.meta["train"]["documents"] + capped.meta["val"]["documents"] == 30
    tokens = hf(str(tmp_path / "json"), streaming=True, cache_dir=cache, max_tokens=1000, **COMMON)
    total = tokens.meta["train"]["tokens"] + tokens.meta["val"]["tokens"]
    assert total == 1000  # the document the cap falls in ends there


def test_hf_errors_are_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data.data_files contains .*nope/\*.jsonl, which matches no file"):
        hf("json", data_files=str(tmp_path / "nope" / "*.jsonl"), cache_dir=cache, **COMMON)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.jsonl").write_text('{"text": ""}\n{"text": "  \\n "}\n')
    with pytest.raises(ConfigError, match=r"data.name=.*blank holds no text"):
        hf(str(tmp_path / "blank"), streaming=True, cache_dir=cache, **COMMON)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jsonl").write_text('{"id": 1, "body": "Some text here."}\n')
    with pytest.raises(ConfigError, match="data.text_column=text is not a column of .*other; columns: id, body"):
        hf(str(tmp_path / "other"), streaming=True, cache_dir=cache, **COMMON)
    with pytest.raises(ConfigError, match="data.name=.*nothing-here could not be loaded"):
        hf(str(tmp_path / "nothing-here"), cache_dir=cache, **COMMON)


def test_text_files_accept_one_path_and_explain_too_little_text(corpus_file, tmp_path):
    assert build(corpus_file, tmp_path).folder == text_files([str(corpus_file)], cache_dir=str(tmp_path / "cache"),
                                                            **COMMON).folder
    assert list(text_file_corpus(str(write(tmp_path / "a.txt", ["First one.", "Second\nparagraph.  "])))) == \
        ["First one.", "Second\nparagraph."]
    with pytest.raises(ConfigError, match="missing.txt, which is not a file"):
        text_file_corpus([str(tmp_path / "missing.txt")])
    with pytest.raises(ConfigError, match="empty.txt, which holds no text"):
        build(write(tmp_path / "empty.txt", ["\n \n"]), tmp_path)
    small = write(tmp_path / "small.txt", PARAGRAPHS[:12])
    with pytest.raises(ConfigError) as err:
        build(small, tmp_path, val_fraction=0.05)
    assert re.search(r"small.txt'\] gives 12 training and 0 validation sequences of 32 tokens: validation needs "
                     r"at least 30 tokens, about \d\.\d KB of text at data.val_fraction=0.05 \(the corpus has 1.7 "
                     r"KB\); use more text, a shorter data.seq_len or a larger data.val_fraction$", str(err.value))


def test_text_files_read_folders_recursively_and_globs_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    write(corpus / "b.txt", ["B one."])
    write(corpus / "a.txt", ["A one.", "A two."])
    write(corpus / "sub" / "c.md", ["C one."])
    write(corpus / ".git" / "HEAD", ["not text of the corpus"])  # hidden: left out
    write(corpus / ".notes.txt", ["hidden too"])
    write(corpus / "empty.txt", ["\n \n"])

    def read(paths):
        with pytest.warns(UserWarning) as caught:
            docs = list(text_file_corpus(paths))
        return docs, [str(w.message) for w in caught]

    docs, warned = read(str(corpus))  # a, b, empty, sub/c: by path
    assert docs == ["A one.", "A two.", "B one.", "C one."]
    assert warned == [f"data.paths: 1 of 4 files hold no text and are skipped: {(corpus / 'empty.txt').resolve()}"]
    docs, _ = read([str(corpus / "*.txt")])
    assert docs == ["A one.", "A two.", "B one."]
    # entries in the order given, a file named twice read once
    assert list(text_file_corpus([str(corpus / "**" / "*.md"), str(corpus / "b.txt"), str(corpus / "b.txt")])) == \
        ["C one.", "B one."]

    with pytest.raises(ConfigError, match=r"data.paths contains .*\*.rst, which matches no file"):
        text_file_corpus([str(corpus / "*.rst")])
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="data.paths contains .*none, a folder that holds no files"):
        text_file_corpus([str(tmp_path / "none")])
    (tmp_path / "blank").mkdir()
    for name in ("x.txt", "y.txt"):
        write(tmp_path / "blank" / name, ["\n"])
    with pytest.raises(ConfigError, match="none of its 2 files holds text"):
        list(text_file_corpus([str(tmp_path / "blank")]))


def test_a_folder_of_text_files_builds_as_its_files_do(tmp_path):
    """The folder's files, by path, make the same corpus as the files listed in that order."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("b.txt", "a.txt", "c.txt")):
        write(corpus / name, PARAGRAPHS[i * 34:(i + 1) * 34])
    listed = text_files([str(corpus / n) for n in ("a.txt", "b.txt", "c.txt")], cache_dir=str(tmp_path / "c1"),
                        **COMMON)
    folder = text_files(str(corpus), cache_dir=str(tmp_path / "c2"), **COMMON)
    assert texts(folder, "train") == texts(listed, "train") and texts(folder, "val") == texts(listed, "val")


def test_known_answer_changes_exactly_the_asked_number_of_training_samples(corpus_file, tmp_path):
    clean = build(corpus_file, tmp_path)
    dup = build(corpus_file, tmp_path, duplicate_fraction=0.1, duplicate_pool=3)
    noisy = build(corpus_file, tmp_path, noise_fraction=0.2)
    n = clean.num_train
    assert dup.folder == noisy.folder == clean.folder  # one token file, variants made while reading
    assert noisy.setting == {"duplicate_fraction": 0.0, "duplicate_pool": 4, "noise_fraction": 0.2}

    def by_sample(data, step):  # every training sample once (batch = the whole set), ordered by index
        index = order.global_batch(n, n, 0, step)
        return unmasked(data.train_batch(step, n, seed=0))[index.argsort()]

    reference = by_sample(clean, 0)
    changed = (by_sample(dup, 0) != reference).any(1)
    assert int(changed.sum()) == round(0.1 * n)
    assert len({tuple(r) for r in by_sample(dup, 0)[changed].tolist()}) <= 3  # copies of the pool
    changed = (by_sample(noisy, 0) != reference).any(1)
    assert int(changed.sum()) == round(0.2 * n)
    assert not torch.isin(by_sample(noisy, 0)[changed][:, 1:-1], clean.special_ids).any()
    assert torch.equal(by_sample(noisy, 0), by_sample(noisy, 1))  # fixed per sample, whatever the epoch
    for data in (dup, noisy):
        for a, b in zip(data.val_batches(8), clean.val_batches(8)):
            assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="data.duplicate_fraction=0.6 and data.noise_fraction=0.5 leave no room"):
        build(corpus_file, tmp_path, duplicate_fraction=0.6, noise_fraction=0.5)


@pytest.mark.parametrize("key,value,message", [
    ("max_predictions", 0, "data.max_predictions=0 is not allowed; each sequence needs at least one masked"),
    ("val_fraction", 1.0, "data.val_fraction=1.0 is not allowed; use a fraction in (0, 1)"),
    ("noise_fraction", -0.1, "data.noise_fraction=-0.1 must lie in [0, 1) (0 leaves the training set as it is)"),
    ("max_tokens", 0, "data.max_tokens=0 is not allowed; use a positive number, or null"),
])
def test_bad_values_name_the_key(corpus_file, tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build(corpus_file, tmp_path, **{key: value})


def test_max_predictions_caps_the_masked_positions(corpus_file, tmp_path):
    data = build(corpus_file, tmp_path, seq_len=64, max_predictions=5)
    assert data.num_masked == 5 and data.train_batch(0, 4, seed=0)["mask_positions"].shape == (4, 5)


def test_a_read_only_cache_is_one_line_but_a_built_one_still_loads(corpus_file, tmp_path):
    built = build(corpus_file, tmp_path)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    locked = [readonly, tmp_path / "cache"]
    for folder in locked:
        folder.chmod(0o555)
        if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute stops it too
            subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        assert build(corpus_file, tmp_path).folder == built.folder
        with pytest.raises(ConfigError, match=f"the data cache {readonly}/text is not writable \\((Permission denied|"
                                              "Operation not permitted)\\); set data.cache_dir"):
            text_files(str(corpus_file), cache_dir=str(readonly), **COMMON)
    finally:
        for folder in locked:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
            folder.chmod(0o755)


def test_a_cache_on_a_read_only_file_system_is_one_line_naming_it(corpus_file, tmp_path, monkeypatch):
    """A read-only mount raises OSError (EROFS), not PermissionError: named all the same, not a traceback."""
    import errno

    import sift_cli.data.text as text

    readonly = tmp_path / "mounted"

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(text, "cache_root", refuse)
    with pytest.raises(ConfigError, match=f"the data cache {readonly} is not writable \\(Read-only file system\\)"):
        text_files(str(corpus_file), cache_dir=str(readonly), **COMMON)


def test_a_checkpoint_tokenizer_keys_the_cache_by_its_content(corpus_file, tmp_path):
    trained = build(corpus_file, tmp_path).tokenizer
    for name in ("a", "b"):
        trained.save_pretrained(tmp_path / name)
    a = build(corpus_file, tmp_path, tokenizer=str(tmp_path / "a"), vocab_size=999)
    b = build(corpus_file, tmp_path, tokenizer=str(tmp_path / "b"))
    assert a.folder == b.folder and a.tokenizer.get_vocab() == trained.get_vocab()
    assert pickle.loads(pickle.dumps(a)).tokenizer.get_vocab() == trained.get_vocab()


TRAIN = """import sys
from pathlib import Path
from sift_cli.data.text import _paragraphs, train_wordpiece
train_wordpiece(_paragraphs(Path(sys.argv[1])), 150, Path(sys.argv[2]))
"""


def test_the_trained_vocabulary_is_a_function_of_the_text_whatever_the_threads(corpus_file, tmp_path):
    """Two trainings on one text, in processes of their own (their own hash seeds) with 1 and 2 threads, number
    every word piece alike: tokenizers' trainer alone breaks ties in hash-map order (tokenizers#1794). The
    continuing pieces given to the trainer ahead of the merges are ordinary tokens, not special ones."""
    for threads in (1, 2):
        subprocess.run([sys.executable, "-c", TRAIN, str(corpus_file), str(tmp_path / f"{threads}.json")],
                       cwd=REPO, check=True, env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert one["model"]["vocab"] == two["model"]["vocab"] and len(one["model"]["vocab"]) == 150
    assert any(piece.startswith("##") for piece in one["model"]["vocab"])
    tok = build(corpus_file, tmp_path).tokenizer
    assert sorted(tok.all_special_ids) == list(range(5)) and len(tok.backend_tokenizer.get_added_tokens_decoder()) == 5
    assert tok.decode(tok("The quick function")["input_ids"], skip_special_tokens=True) == "The quick function"


def test_the_process_that_built_the_cache_and_those_that_load_it_agree_on_the_data(corpus_file, tmp_path):
    """Under torchrun one process builds the cache and the others load it: their fingerprints must match, else
    every rank is refused; also for a checkpoint's tokenizer whose saved settings (truncation) the build turns
    off."""
    trained = build(corpus_file, tmp_path).tokenizer
    trained.backend_tokenizer.enable_truncation(64)
    trained.save_pretrained(tmp_path / "tok")
    built = build(corpus_file, tmp_path / "cache", tokenizer=str(tmp_path / "tok"))
    loaded = build(corpus_file, tmp_path / "cache", tokenizer=str(tmp_path / "tok"))
    assert loaded.folder == built.folder and loaded.fingerprint == built.fingerprint


def test_docstrings_are_read_with_ast_without_importing_and_cached(tmp_path, caplog):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module docstring that is long enough."""\nraise SystemExit("never imported")\n'
        'class A:\n    """Class docstring, also long enough."""\n    def f(self):\n        """Too short"""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "t.py").write_text('"""A test module docstring, skipped."""\n')
    docs = _docstrings_in(tmp_path, skip=("tests",))
    assert docs == ["Module docstring that is long enough.", "Class docstring, also long enough."]
    everything = docs + ["A test module docstring, skipped."]
    assert _cached_docs("pkg", "1.0", tmp_path / "pkg", tmp_path / "cache") == everything
    [cache] = (tmp_path / "cache" / "docstrings").glob("pkg-1.0-*.json")
    cache.write_bytes(cache.read_bytes()[:20])  # an interrupted copy
    with caplog.at_level(logging.WARNING):
        assert _cached_docs("pkg", "1.0", tmp_path / "pkg", tmp_path / "cache", skip=("tests",)) == docs
    assert "does not load" in caplog.text


def test_the_standard_library_corpus_is_large_english_text(tmp_path):
    docs = list(docstring_corpus([], tmp_path))
    assert len(docs) > 5000 and sum(map(len, docs)) > 1_000_000
    assert list((tmp_path / "docstrings").glob("python-stdlib-*.json"))
    with pytest.raises(ConfigError, match="data.packages contains no_such_pkg"):
        docstring_corpus(["no_such_pkg"], tmp_path)
    data = docstrings([], cache_dir=str(tmp_path), max_documents=400, **COMMON)
    assert data.meta["train"]["documents"] + data.meta["val"]["documents"] == 400 and data.num_train > 50
