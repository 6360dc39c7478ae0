"""benchmarks/exit_diagnostics.py at a tiny size: a decoder from scratch, exported with its tokenizer, continued as a
pretrained model on other text, and every exit's ranking against the exact loss reported for both runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sift_cli.checkpoint import Checkpointer, load_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import exit_diagnostics  # noqa: E402


def test_a_decoder_from_scratch_and_continued_from_its_export_reports_every_exit(corpus_file, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"  # the continued run's text: the corpus's paragraphs in reverse order
    other.write_text("\n\n".join(reversed(corpus_file.read_text().split("\n\n"))))
    runs, out = tmp_path / "runs", tmp_path / "report.md"
    monkeypatch.setattr(sys, "argv", [
        "exit_diagnostics.py", "--budget", "3", "--every", "2", "--layers", "3", "--points", "3", "--runs-dir",
        str(runs), "--out", str(out), "--continued-set", f"data.paths=[{other}]", "data=text_files_causal",
        "~data.packages",  # the experiment's docstrings packages: text files have none
        f"data.paths=[{corpus_file}]", "data.vocab_size=200", "data.seq_len=32", "data.val_fraction=0.2",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.eval_every_s=1", "trainer.compile=false"])
    exit_diagnostics.main()

    # the export is the scratch run's final weights, in transformers' form, with the tokenizer the run trained
    exported = AutoModelForCausalLM.from_pretrained(runs / "scratch" / "hf")
    final = load_tensors(Checkpointer(runs / "scratch", keep=1).newest()[0])["model"]
    assert exported.config.num_hidden_layers == 3
    assert all(torch.equal(p, final[f"lm.{name}"]) for name, p in exported.state_dict().items())
    assert (runs / "scratch" / "hf" / "tokenizer.json").exists()
    assert "model.pretrained=" in (runs / "continued" / ".hydra" / "overrides.yaml").read_text()

    report = out.read_text()
    for name in ("From scratch", "Continued training"):
        assert re.search(rf"\*\*{name}\*\* .*exit 1: Spearman -?[\d.]+, overlap [\d.]+; exit 2: ", report), name
        table = report.split(f"### {name}")[1].split("\n\n")[1].splitlines()
        assert table[0].startswith("| step | training s | Spearman k=1 | Spearman k=2 | Spearman k=3 | overlap k=1")
        for row in table[2:]:  # the top exit is the exact loss itself
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert (cells[4], cells[7]) == ("1.000", "1.00"), row
    assert (out.parent / "report-plots" / "diagnostics.png").exists()
