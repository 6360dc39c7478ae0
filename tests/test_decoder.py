import pytest
import torch
from transformers import (AutoModelForCausalLM, CohereConfig, CohereForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from sift_cli.config import ConfigError
from sift_cli.models.decoder import CausalLM

VOCAB, LENGTH = 60, 16
SIZES = {"num_layers": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "max_position": 64}


def tiny_model(arch="gpt2", seed=0, **options):
    torch.manual_seed(seed)
    return CausalLM(VOCAB, LENGTH, arch=arch, **{**SIZES, **options}).eval()


def neox_folder(path):
    """A GPT-NeoX (Pythia's architecture) written by save_pretrained: a third family, loaded as a user's would be."""
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def qwen2_folder(path):
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
                     ).save_pretrained(path)
    return path


def causal_batch(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, LENGTH + 1), generator=g)}


def every_architecture(tmp_path):
    """gpt2 and llama from config, and GPT-NeoX and Qwen2 through model.pretrained (save_pretrained folders)."""
    yield tiny_model("gpt2")
    yield tiny_model("llama")
    for make in (neox_folder, qwen2_folder):
        yield CausalLM(VOCAB, LENGTH, pretrained=str(make(tmp_path / make.__name__))).eval()


def test_the_exit_at_full_depth_is_the_models_own_labels_loss(tmp_path):
    batch = causal_batch()
    for model in every_architecture(tmp_path):
        ids = batch["input_ids"]
        reference = model.lm(input_ids=ids, labels=ids).loss
        assert torch.allclose(model.loss(batch), reference, atol=1e-5), type(model.lm).__name__
        assert torch.allclose(model.exit_scores(batch, model.depth, "loss").mean(), reference, atol=1e-5)
        sums = model.evaluate(batch)
        assert sums["count"] == ids.shape[0] * LENGTH
        assert torch.allclose(sums["loss_sum"] / sums["count"], reference, atol=1e-5)


def test_a_save_pretrained_folder_of_each_architecture_loads_with_its_weights(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")  # the model's own export: transformers' form
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    folders = [tmp_path / "gpt2", tmp_path / "llama", neox_folder(tmp_path / "neox"), qwen2_folder(tmp_path / "qwen2")]
    batch = causal_batch()
    for folder in folders:
        model = CausalLM(VOCAB, LENGTH, pretrained=str(folder)).eval()
        saved = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.depth == 3 and model.max_length == 64
        assert all(torch.equal(a, b) for a, b in zip(model.lm.state_dict().values(), saved.state_dict().values()))
        ids = batch["input_ids"]
        assert torch.allclose(model.loss(batch), saved(input_ids=ids, labels=ids).loss, atol=1e-5), folder.name


def test_the_cheap_pass_at_k_runs_k_blocks(tmp_path):
    for model in every_architecture(tmp_path):
        calls = []
        for block in model._part("blocks"):
            block.register_forward_hook(lambda *_: calls.append(1))
        for k in range(1, model.depth + 1):
            calls.clear()
            model.exit_scores(causal_batch(), k, "loss")
            assert len(calls) == k


def test_score_positions_scores_evenly_spaced_positions():
    model = tiny_model(score_positions=4)
    assert model.positions.tolist() == [0, 5, 10, 15]
    batch = causal_batch()
    ids = batch["input_ids"]
    per_token = torch.nn.functional.cross_entropy(model.lm(input_ids=ids[:, :-1]).logits.transpose(1, 2),
                                                  ids[:, 1:], reduction="none")
    assert torch.allclose(model.exit_scores(batch, model.depth, "loss"), per_token[:, [0, 5, 10, 15]].mean(1),
                          atol=1e-5)


def test_tuned_exits_train_and_never_reach_the_body():
    lens, tuned = tiny_model("llama"), tiny_model("llama", exit_head="tuned")
    batch = causal_batch()
    # identity translators: the tuned lens starts as the logit lens
    assert torch.allclose(tuned.exit_scores(batch, 1, "loss"), lens.exit_scores(batch, 1, "loss"))
    tuned.train(), lens.train()
    tuned_loss, lens_loss = tuned.loss(batch), lens.loss(batch)
    assert torch.allclose(tuned_loss, lens_loss)  # the value is the model's own loss
    tuned_loss.backward(), lens_loss.backward()
    body = dict(lens.named_parameters())
    for name, p in tuned.named_parameters():
        if name.startswith("translators"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert torch.equal(p.grad, body[name].grad), name
    # trained on their own, the translators bring exit 1's distribution closer to the final layer's
    with torch.no_grad():
        final = tuned.lm(input_ids=batch["input_ids"][:, :-1]).logits.log_softmax(-1)

    def divergence():
        with torch.no_grad():
            exit1 = tuned._logits(tuned._hidden(batch["input_ids"][:, :-1], 1)[-1], 1).log_softmax(-1)
            return torch.nn.functional.kl_div(exit1, final, log_target=True, reduction="batchmean").item()

    before = divergence()
    optimizer = torch.optim.Adam(tuned.translators.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        tuned.loss(batch).backward()
        optimizer.step()
    assert divergence() < before


def test_scoring_and_loss_compile_whole(tmp_path):
    from sift_cli.selection import select

    batch = causal_batch(batch=8)
    models = [tiny_model("gpt2"), tiny_model("llama", exit_head="tuned", score_positions=5),
              CausalLM(VOCAB, LENGTH, pretrained=str(neox_folder(tmp_path / "neox"))).eval()]
    for model in models:
        def step(batch):
            scores, features = model.exit_scores(batch, 1, "loss", features=True)
            kept = {k: v[select(scores, 4, "diverse", None, features)] for k, v in batch.items()}
            return scores, model(kept)

        with torch.no_grad():
            eager = step(batch)
            compiled = torch.compile(step, fullgraph=True, backend="eager")(batch)
        assert torch.allclose(compiled[0], eager[0]) and torch.allclose(compiled[1], eager[1])


def test_bad_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.score_positions=17 is more than the 16 positions"):
        tiny_model(score_positions=17)
    with pytest.raises(ConfigError, match="model.arch=bert is not allowed"):
        tiny_model("bert")
    with pytest.raises(ConfigError, match="model.exit_head=probe is not allowed"):
        tiny_model(exit_head="probe")
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    # Cohere multiplies its logits by a scale: the blocks are found, but the exit would not be the model's own
    CohereForCausalLM(CohereConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, logit_scale=0.5)).save_pretrained(tmp_path / "cohere")
    (tmp_path / "empty").mkdir()
    for folder, message in (("empty", "could not be loaded as a causal language model"),
                            ("bert", "is a BertLMHeadModel \\(bert\\) whose decoder blocks"),
                            ("cohere", "blocks, run one by one, do not reproduce its own logits")):
        with pytest.raises(ConfigError, match=message) as err:
            CausalLM(VOCAB, LENGTH, pretrained=str(tmp_path / folder))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="has 60 token embeddings but the data's tokenizer has 100 tokens"):
        CausalLM(100, LENGTH, pretrained=str(neox_folder(tmp_path / "neox")))
