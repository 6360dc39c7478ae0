import pytest
import torch

from conftest import CORPUS
from sift_cli.config import ConfigError
from sift_cli.data.text import _docstrings_in, docstring_corpus, hf, pack, text_file_corpus, text_files

COMMON = dict(vocab_size=200, seq_len=32, val_fraction=0.2, max_val_samples=64, split_seed=0,
              mlm_probability=0.15, tokenizer=None, cache_dir=None)


def test_docstrings_are_read_with_ast_without_importing(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module docstring that is long enough."""\nraise SystemExit("never imported")\n'
        'class A:\n    """Class docstring, also long enough."""\n    def f(self):\n        """Too short"""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "t.py").write_text('"""A test module docstring, skipped."""\n')
    docs = _docstrings_in(tmp_path, skip=("tests",))
    assert docs == ["Module docstring that is long enough.", "Class docstring, also long enough."]


def test_the_standard_library_corpus_is_large_english_text(tmp_path):
    docs = docstring_corpus([], tmp_path)
    assert len(docs) > 5000 and sum(map(len, docs)) > 1_000_000
    assert docstring_corpus([], tmp_path) == docs  # the second read comes from the cache
    assert list((tmp_path / "docstrings").glob("python-stdlib-*.json"))
    with pytest.raises(ConfigError, match="data.packages contains no_such_pkg"):
        docstring_corpus(["no_such_pkg"], tmp_path)


def test_packed_sequences_have_fixed_length_and_special_tokens(corpus_file):
    data = text_files([str(corpus_file)], **COMMON)
    ids = data.train_ids
    assert ids.shape[1] == 32 and len(ids) == data.num_train > 0
    assert (ids[:, 0] == data.tokenizer.cls_token_id).all() and (ids[:, -1] == data.tokenizer.sep_token_id).all()
    assert data.model_args == {"vocab_size": len(data.tokenizer)}


def test_masking_follows_the_mlm_collator_and_validation_is_fixed(corpus_file):
    a, b = text_files([str(corpus_file)], **COMMON), text_files([str(corpus_file)], **COMMON)
    for x, y in zip(a.val_batches(8), b.val_batches(8)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    batch = next(a.train_batches(16, seed=0))
    masked = batch["labels"] != -100
    assert 0 < masked.float().mean() < 0.4
    assert (batch["labels"][:, 0] == -100).all()  # [CLS] is never masked
    assert (batch["input_ids"][masked] == a.tokenizer.mask_token_id).float().mean() > 0.5  # 80% -> [MASK]
    again = next(b.train_batches(16, seed=0))
    other = next(b.train_batches(16, seed=1))
    assert torch.equal(batch["labels"], again["labels"]) and not torch.equal(batch["labels"], other["labels"])


def test_epochs_reshuffle_and_only_full_batches(corpus_file):
    data = text_files([str(corpus_file)], **COMMON)
    batches = data.train_batches(7, seed=0)
    per_epoch = data.num_train // 7
    sizes = [len(next(batches)["labels"]) for _ in range(2 * per_epoch + 1)]
    assert set(sizes) == {7}


def test_text_files_split_paragraphs_and_reject_missing_or_empty(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    assert text_file_corpus([str(tmp_path / "a.txt")]) == ["First paragraph.", "Second paragraph."]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="empty.txt, which holds no text"):
        text_file_corpus([str(tmp_path / "empty.txt")])
    with pytest.raises(ConfigError, match="missing.txt, which is not a file"):
        text_file_corpus([str(tmp_path / "missing.txt")])


def test_hf_dataset_from_a_local_folder_and_an_unknown_column(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    import csv

    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        for i, par in enumerate(CORPUS.split("\n\n")):
            w.writerow([i, par])
    data = hf(str(folder), text_column="body", **COMMON)
    assert data.num_train > 0 and data.task == "mlm"
    with pytest.raises(ConfigError, match="data.text_column=text is not a column of .*; columns: id, body"):
        hf(str(folder), text_column="text", **COMMON)
    with pytest.raises(ConfigError, match="data.name=.*nothing-here could not be loaded"):
        hf(str(tmp_path / "nothing-here"), **COMMON)


def test_pack_joins_documents_with_sep():
    class Tok:
        cls_token_id, sep_token_id = 1, 2

        def __call__(self, docs, **kw):
            return {"input_ids": [[10] * len(d) for d in docs]}

    rows = pack(["aaa", "bb"], Tok(), seq_len=5)
    assert rows.tolist() == [[1, 10, 10, 10, 2], [1, 2, 10, 10, 2]]
