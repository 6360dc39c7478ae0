from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import make_config
from sift_cli.config import ConfigError, validate
from sift_cli.train import CONF, precheck

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "local")


def choices(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_config_group_choice_composes_and_validates(group, choice):
    extra = {"data": {"text_files": ["data.paths=[a.txt]"], "hf": ["data.name=x"]}}
    cfg = make_config([f"{group}={choice}", *extra.get(group, {}).get(choice, [])])
    validate(cfg)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_defaults_are_the_documented_experiment():
    cfg = make_config([])
    assert (cfg.exit_layer, cfg.frac, cfg.criterion, cfg.seed) == (1, 0.5, "loss", 0)
    assert cfg.model.num_layers == 2 and cfg.data._target_.endswith("docstrings")
    assert cfg.trainer.device == "auto" and cfg.logger.backend == "wandb" and cfg.logger.mode == "auto"


def test_bert_is_bert_base_and_the_paper_experiment_pins_its_setting():
    base = make_config(["model=bert"]).model
    assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size) == (12, 768, 12, 3072)
    paper = make_config(["experiment=paper_bert"])
    assert paper.model.num_layers == 12 and (paper.exit_layer, paper.frac, paper.criterion) == (1, 0.5, "loss")


def test_checkpoint_tokenizer_follows_model_pretrained():
    cfg = make_config(["model.pretrained=/ckpt"])
    assert cfg.data.tokenizer == "/ckpt"


@pytest.mark.parametrize("override,message", [
    ("frac=1.5", "frac=1.5 is outside (0, 1]"),
    ("frac=0", "frac=0.0 is outside (0, 1]"),
    ("exit_layer=0", "exit_layer=0 must be at least 1"),
    ("criterion=margin", "criterion=margin is not allowed; choose one of: loss, entropy, random"),
    ("trainer.max_steps=-3", "trainer.max_steps=-3 must be positive"),
    ("trainer.max_time_s=-1", "trainer.max_time_s=-1.0 must be positive"),
    ("trainer.precision=fp8", "trainer.precision=fp8 is not allowed"),
    ("trainer.scheduler=linear", "trainer.scheduler=linear decays over trainer.max_steps"),
    ("model=gpt2", "model=gpt2 is not a known model; choose one of: bert, bert_large"),
    ("frac=abc", "frac=abc"),
])
def test_bad_values_are_rejected_with_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        precheck([override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_precheck_expands_sweeps_so_a_bad_value_stops_the_whole_sweep():
    precheck(["frac=0.25,0.5,1.0", "criterion=loss,entropy"])
    with pytest.raises(ConfigError, match="frac=1.5"):
        precheck(["frac=0.5,1.5"])


@pytest.mark.parametrize("overrides", [["data=digits"], ["data=text_files", "data.paths=[CORPUS]"]])
def test_the_debug_group_builds_with_every_offline_data_choice(overrides, corpus_file):
    from sift_cli.train import build

    cfg = make_config(["debug=default", *(o.replace("CORPUS", str(corpus_file)) for o in overrides)])
    assert build(cfg.data).num_train > 0


def test_a_key_the_target_does_not_take_is_a_one_line_error():
    from sift_cli.train import build

    with pytest.raises(ConfigError, match="sift_cli.data.images.digits does not accept this config: .*colour"):
        build(make_config(["data=digits", "+data.colour=red"]).data)
