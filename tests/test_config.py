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
    extra = {"data": {"text_files": ["data.paths=[a.txt]"], "hf": ["data.name=x"],
                      "image_folder": ["data.root=x", "model=resnet18"], "digits": ["model=resnet18"],
                      "cifar10": ["model=resnet18"], "docstrings_causal": ["model=gpt2_tiny"],
                      "text_files_causal": ["data.paths=[a.txt]", "model=gpt2_tiny"],
                      "hf_causal": ["data.name=x", "model=gpt2_tiny"]},
             "model": {"resnet18": ["data=digits"], "resnet50": ["data=digits"],
                       "causal_lm": ["model.pretrained=gpt2"]},  # a hub name: not looked up before the run
             # benchmarks/gpu.sh writes their corpus
             "experiment": {"tta_gpu": ["data.paths=[a.txt]"], "tta_gpu_gpt2": ["data.paths=[a.txt]"]}}
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
    ("criterion=margin", "criterion=margin is not allowed; choose one of: loss, entropy, random, gradnorm"),
    ("trainer.max_steps=-3", "trainer.max_steps=-3 must be positive"),
    ("trainer.max_time_s=-1", "trainer.max_time_s=-1.0 must be positive"),
    ("trainer.precision=fp8", "trainer.precision=fp8 is not allowed"),
    ("trainer.scheduler=linear trainer.schedule_unit=steps",
     "trainer.scheduler=linear with trainer.schedule_unit=steps decays over trainer.max_steps, which is null; "
     "use trainer.schedule_unit=time"),
    ("trainer.schedule_unit=epochs", "trainer.schedule_unit=epochs is not allowed; choose one of: time, steps"),
    ("trainer.compile=maybe", "trainer.compile=maybe is not allowed; choose one of: auto, true, false"),
    ("trainer.compile_mode=fastest", "trainer.compile_mode=fastest is not allowed; choose one of: auto, "
                                     "default, reduce-overhead, max-autotune"),
    ("trainer.selection_scope=world", "trainer.selection_scope=world is not allowed; choose one of: local, global"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0 must be at least 1"),
    ("trainer.bach_size=8", "trainer.bach_size is not a known key; did you mean trainer.batch_size?"),
    ("+trainer.bach_size=8", "trainer.bach_size is not a known key; did you mean trainer.batch_size?"),
    ("+logger.projekt=x", "logger.projekt is not a known key; did you mean logger.project?"),
    ("+sede=3", "sede is not a known key; did you mean seed?"),
    ("trainer.warmup_steps=10", "trainer.warmup_steps is not a known key; did you mean trainer.warmup?"),
    ("data=text_files", "data.paths is required and has no value; set it on the command line, e.g. "
                        "data.paths=[corpus.txt]"),
    ("data=hf", "data.name is required and has no value"),
    ("data=image_folder", "data.root is required and has no value"),
    ("exit_layer=3", "exit_layer=3 is beyond bert_tiny, which has 2 blocks; choose 1..2"),
    ("model=resnet18 data=digits exit_layer=5", "exit_layer=5 is beyond resnet18, which has 4 blocks"),
    ("data.seq_len=600", "data.seq_len=600 is longer than the model's 512 positions (model.max_position)"),
    ("model=gpt3", "model=gpt3 is not a known model; choose one of: bert, bert_large"),
    ("frac=abc", "frac=abc is not a number"),
    ("seed=1.5", "seed=1.5 is not a whole number"),
    ("trainer.deterministic=maybe", "trainer.deterministic=maybe is not true or false"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0 must be a positive number of samples"),
    ("targets=[abc]", "targets contains abc; target accuracies lie in (0, 1]"),
    ("trainer.optimizer.lr=-1", "trainer.optimizer (torch.optim.AdamW) refuses its settings: Invalid learning rate"),
    ("trainer.optimizer.betas=[2,0.9]", "refuses its settings: Invalid beta parameter at index 0"),
    ("trainer.optimizer._target_=torch.optim.SGD", "trainer.optimizer (torch.optim.SGD) refuses its settings: "
                                                   "SGD.__init__() got an unexpected keyword argument 'betas'; "
                                                   "remove a key with ~trainer.optimizer.KEY"),
    ("trainer.optimizer._target_=torch.optim.Adamx", "trainer.optimizer._target_=torch.optim.Adamx cannot be "
                                                     "imported"),
    ("trainer.optimizer=sgd", "trainer.optimizer=sgd is not an optimizer config"),
    ("model._target_=nowhere.Model", "model._target_=nowhere.Model cannot be imported (No module named 'nowhere')"),
    ("data._target_=sift_cli.data.text.nothing", "data._target_=sift_cli.data.text.nothing cannot be imported"),
    ("trainer.resume=/no/such/folder", "trainer.resume=/no/such/folder is not a folder"),
    ("model.pretrained=./no/such/folder", "model.pretrained=./no/such/folder is not a folder"),
    ("data.cache_dir=${oc.env:SIFT_TEST_UNSET}", "data.cache_dir cannot be resolved: "),
    ("trainer.max_time_s=${nowhere}", "trainer.max_time_s cannot be resolved: "),
    # model and data: the signature of their target is their schema
    ("model=resnet18", "model=resnet18 trains on image data but data=docstrings is mlm data; pick a data choice"),
    ("data=digits +data.colour=red", "data.colour is not a key of sift_cli.data.images.digits; its keys: image_size"),
    ("data=text_files data.paths=[a.txt] +data.packages=[torch]",  # a key of another text source
     "data.packages is not a key of sift_cli.data.text.text_files"),
    ("+data.seq_length=64",
     "data.seq_length is not a key of sift_cli.data.text.docstrings; did you mean data.seq_len?"),
    ("+model.hidden=64", "model.hidden is not a key of sift_cli.models.bert.BertMLM; did you mean model.hidden_size?"),
    ("data.split_seed=abc", "data.split_seed=abc is not a whole number"),
    ("data.max_val_samples=many", "data.max_val_samples=many is not a whole number or null"),
    ("data.packages=torch", "data.packages=torch is not a list of strings"),
    ("model.dropout=true", "model.dropout=true is not a number"),
    ("model=resnet18 data=digits data.mean=[0.5,x,0.5]", "data.mean=[0.5,x,0.5] is not a list of numbers"),
])
def test_bad_values_are_rejected_with_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        precheck(override.split())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_another_optimizer_is_a_target_and_its_own_keys():
    precheck(["trainer.optimizer._target_=torch.optim.SGD", "~trainer.optimizer.betas",
              "+trainer.optimizer.momentum=0.9"])


def test_precheck_expands_sweeps_so_a_bad_value_stops_the_whole_sweep():
    precheck(["frac=0.25,0.5,1.0", "criterion=loss,entropy"])
    with pytest.raises(ConfigError, match="frac=1.5"):
        precheck(["frac=0.5,1.5"])
    with pytest.raises(ConfigError, match="exit_layer=3 is beyond"):  # known from the config: no job runs first
        precheck(["--multirun", "exit_layer=1,3"])


def test_precheck_honours_the_users_config_dir_and_config_path(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nfrac: 0.25\n")
    precheck(["--config-dir", str(tmp_path), "experiment=mine"])
    with pytest.raises(ConfigError, match="experiment=mine is not a known experiment"):
        precheck(["experiment=mine"])
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.yaml").write_text((CONF / "config.yaml").read_text().replace("frac: 0.5", "frac: 7"))
    for group in ("model", "data", "trainer", "logger", "experiment", "debug", "local"):
        (own / group).symlink_to(CONF / group)
    with pytest.raises(ConfigError, match="frac=7"):  # the primary config comes from --config-path
        precheck(["--config-path", str(own)])


def test_a_decaying_schedule_follows_the_unit_of_the_budget():
    validate(make_config(["trainer.scheduler=cosine"]))  # time unit, time budget: decays over max_time_s
    validate(make_config(["trainer.scheduler=linear", "trainer.schedule_unit=steps", "trainer.max_steps=100"]))
    with pytest.raises(ConfigError, match="decays over trainer.max_time_s, which is null"):
        validate(make_config(["trainer.scheduler=linear", "trainer.max_time_s=null", "trainer.max_steps=10"]))


@pytest.mark.parametrize("overrides", [["data=digits"], ["data=text_files", "data.paths=[CORPUS]", "data.val_fraction=0.2"]])
def test_the_debug_group_builds_with_every_offline_data_choice(overrides, corpus_file):
    from sift_cli.train import build

    cfg = make_config(["debug=default", *(o.replace("CORPUS", str(corpus_file)) for o in overrides)])
    assert build(cfg.data).num_train > 0


def test_image_normalisation_takes_one_value_per_channel():
    from sift_cli.train import build

    with pytest.raises(ConfigError, match=r"data.mean=\[0.5, 0.5\] is not allowed; give 3 values, one per channel"):
        build(make_config(["data=digits", "data.mean=[0.5,0.5]"]).data)


def test_make_runs_advice_is_a_setting_a_committed_report_measured():
    """The sweep `make run` recommends composes, and pins the setting of the report it cites: BERT-Mini in bf16,
    720 s a run, the report where every arm left the first plateau."""
    import re

    from conftest import REPO

    makefile = (REPO / "Makefile").read_text()
    sweep = re.search(r"sift-train --multirun (.+?)\"", makefile).group(1).split()
    report = REPO / re.search(r"benchmarks/results/\S+\.md", makefile).group(0)
    cfg = make_config([o.split(",")[0] for o in sweep])  # the sweep's first job stands for all
    validate(cfg)
    setup = report.read_text().split("- Setup")[1].splitlines()[0]
    for override in ("model=bert_mini", "model.low_precision_layernorm=false", "trainer.precision=bf16",
                     "trainer.max_time_s=720", "trainer.eval_every_s=20", "trainer.warmup=30"):
        assert override in setup, override
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.low_precision_layernorm) == (4, 256, False)
    assert (cfg.trainer.precision, cfg.trainer.max_time_s, cfg.trainer.eval_every_s, cfg.trainer.warmup) == (
        "bf16", 720, 20, 30)
    assert list(cfg.data.packages) == ["torch", "transformers"] and cfg.data.seq_len == 64
