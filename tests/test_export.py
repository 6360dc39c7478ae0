"""trainer.export: a text run leaves its model and tokenizer in a save_pretrained folder transformers loads alone."""

import json
import signal

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from conftest import make_config, sift_train, tiny_overrides
from sift_cli.checkpoint import load_tensors
from sift_cli.config import ConfigError, validate
from sift_cli.records import read_metrics
from sift_cli.train import run


def transformers_val_loss(folder, batches) -> float:
    """The validation loss of a save_pretrained folder, by transformers alone: each masked token's label in place,
    -100 elsewhere, the model's own mean loss weighted by its token count."""
    model = AutoModelForMaskedLM.from_pretrained(folder)  # in eval mode
    total = count = 0
    with torch.no_grad():
        for b in batches:
            labels = torch.full_like(b["input_ids"], -100).scatter(1, b["mask_positions"], b["mask_labels"])
            total += model(input_ids=b["input_ids"], labels=labels).loss.item() * b["mask_labels"].numel()
            count += b["mask_labels"].numel()
    return total / count


def test_an_exported_bert_gives_the_recorded_validation_loss_and_trains_on(corpus_file, tmp_path):
    cfg = make_config(tiny_overrides(corpus_file))
    run(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "hf"
    recorded = read_metrics(tmp_path / "run")[-1]
    assert recorded["step"] == 6
    data = instantiate(cfg.data)  # the run's masked validation tokens (from the cache the run built)
    assert transformers_val_loss(folder, data.val_batches(16)) == pytest.approx(recorded["val_loss"], rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == data.tokenizer.get_vocab()
    text = "The quick function returns the length of its argument."
    assert tokenizer(text)["input_ids"] == data.tokenizer(text)["input_ids"]
    assert not (tmp_path / "run" / "hf.partial").exists()

    # model.pretrained takes it back: a new run starts from the exported weights
    run(make_config(tiny_overrides(corpus_file, f"model.pretrained={folder}")), tmp_path / "again")
    assert read_metrics(tmp_path / "again")[0]["val_loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)


def causal_val_loss(folder, batches) -> float:
    """The validation loss of an exported decoder, by transformers alone: the model's own next-token loss of each
    window (its L+1 tokens as input_ids and labels: L predictions), weighted by its prediction count."""
    model = AutoModelForCausalLM.from_pretrained(folder)  # in eval mode
    total = count = 0
    with torch.no_grad():
        for b in batches:
            ids = b["input_ids"]
            total += model(input_ids=ids, labels=ids).loss.item() * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
    return total / count


@pytest.mark.parametrize("model", ["gpt2_tiny", "llama_tiny"])
def test_an_exported_decoder_gives_the_recorded_validation_loss_and_trains_on(corpus_file, tmp_path, model):
    causal = [o if o != "data=text_files" else "data=text_files_causal" for o in tiny_overrides(corpus_file)]
    size = ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128"] * (model == "llama_tiny")
    cfg = make_config([*causal, f"model={model}", *size, "model.exit_head=tuned"])
    run(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "hf"
    recorded = read_metrics(tmp_path / "run")[-1]
    assert recorded["step"] == 6
    data = instantiate(cfg.data)  # the run's validation windows (from the cache the run built)
    assert causal_val_loss(folder, data.val_batches(16)) == pytest.approx(recorded["val_loss"], rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == data.tokenizer.get_vocab()
    text = "The quick function returns the length of its argument."
    assert tokenizer(text)["input_ids"] == data.tokenizer(text)["input_ids"]
    # the final checkpoint's weights, tensor for tensor, less the tuned lens's translators (sift-train's scoring
    # heads, not part of the model)
    saved = load_tensors(tmp_path / "run" / "checkpoints" / "step-000000006")["model"]
    exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    model_keys = {k for k in saved if not k.startswith("translators.")}
    assert model_keys < saved.keys() and exported.keys() == {k.removeprefix("lm.") for k in model_keys}
    assert all(torch.equal(exported[k.removeprefix("lm.")], saved[k]) for k in model_keys)

    # model=causal_lm model.pretrained takes it back: a new run starts from the exported weights and tokenizer
    again = make_config([*causal, "model=causal_lm", f"model.pretrained={folder}"])
    assert again.data.tokenizer == str(folder)
    run(again, tmp_path / "again")
    assert read_metrics(tmp_path / "again")[0]["val_loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)


def test_a_preempted_run_exports_the_weights_of_its_last_checkpoint(corpus_file, tmp_path):
    out = sift_train(*tiny_overrides(corpus_file), f"hydra.run.dir={tmp_path}", SIFT_TEST_SIGNAL="SIGTERM:4")
    assert out.returncode == -signal.SIGTERM, out.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "preempted"
    saved = load_tensors(tmp_path / "checkpoints" / "step-000000004")["model"]
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").state_dict()
    assert exported.keys() == {k.removeprefix("mlm.") for k in saved}
    assert all(torch.equal(exported[k.removeprefix("mlm.")], v) for k, v in saved.items())


def test_export_false_writes_no_folder(corpus_file, tmp_path):
    run(make_config(tiny_overrides(corpus_file, "trainer.max_steps=1", "trainer.export=false")), tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "hf").exists()


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet18", "data=digits", "trainer.export=true"],
     "trainer.export=true but model=resnet18 has no transformers form to save"),
    (["trainer.export=maybe"], "trainer.export=maybe is not allowed; choose one of: auto, true, false"),
])
def test_bad_export_values_are_one_line(overrides, message):
    cfg = make_config(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, {"model": "resnet18"} if "model=resnet18" in overrides else None)
