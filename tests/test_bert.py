import torch
import torch.nn.functional as F

from sift_cli.models.bert import BertMLM


def tiny_model(seed=0, **options):
    torch.manual_seed(seed)
    return BertMLM(vocab_size=50, num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64,
                   max_position=64, **options).eval()


def masked_batch(seed=0, batch=6, length=16, vocab=50, predictions=4):
    """The data's format: the same number of masked positions in every row, as [B, P] index and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    positions = torch.rand(batch, length, generator=g).topk(predictions, dim=1).indices
    labels = ids.gather(1, positions)
    inputs = ids.scatter(1, positions, 4)  # [MASK]
    return {"input_ids": inputs, "mask_positions": positions, "mask_labels": labels}


def full_labels(batch):
    """transformers' labels: -100 everywhere but the masked positions."""
    return torch.full_like(batch["input_ids"], -100).scatter(1, batch["mask_positions"], batch["mask_labels"])


def test_masked_only_loss_equals_bert_for_masked_lm():
    model, batch = tiny_model(), masked_batch()
    reference = model.mlm(input_ids=batch["input_ids"], labels=full_labels(batch)).loss
    assert torch.allclose(model.loss(batch), reference, atol=1e-5)
    assert torch.allclose(model(batch), reference, atol=1e-5)  # the module's call is the training loss


def test_scoring_selection_and_loss_compile_whole_with_static_shapes():
    """A graph break under fullgraph=True means a host sync or a data-dependent shape crept back in."""
    from sift_cli.selection import select

    model, batch = tiny_model(), masked_batch(batch=8)
    def step(batch):
        scores = model.exit_scores(batch, 1, "loss")
        keep = select(scores, 4, "loss", None)
        kept = {k: v[keep] for k, v in batch.items()}
        return scores, model(kept)

    def diverse(batch):
        scores, features = model.exit_scores(batch, 2, "loss", features=True)
        return select(scores, 4, "diverse", None, features)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager_scores, eager_loss = step(batch)
        scores, loss = compiled(batch)
        assert torch.equal(torch.compile(diverse, fullgraph=True, backend="eager")(batch), diverse(batch))
    assert torch.allclose(scores, eager_scores) and torch.allclose(loss, eager_loss)


def test_low_precision_layer_norms_keep_the_encoder_in_the_autocast_dtype():
    """model.low_precision_layernorm: nn.LayerNorm's results without autocast; under bf16 autocast the hidden
    states stay bf16 where the standard norms hand on fp32, the loss and gradients stay close to theirs, and the
    training loss still compiles whole."""
    standard, low = tiny_model(), tiny_model(low_precision_layernorm=True)
    batch = masked_batch()
    assert torch.equal(low.loss(batch), standard.loss(batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert low._encode(batch["input_ids"], 3).dtype == torch.bfloat16
        assert standard._encode(batch["input_ids"], 3).dtype == torch.float32
        losses = [model.loss(batch) for model in (standard, low)]
        compiled = torch.compile(low.loss, fullgraph=True, backend="eager")(batch)
    assert torch.equal(compiled, losses[1])
    assert abs(losses[1].item() - losses[0].item()) < 0.01 * losses[0].item()
    grads = []
    for model, loss in zip((standard, low), losses):
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_exact_exit_score_is_the_per_sample_loss_of_the_full_model():
    model, batch = tiny_model(), masked_batch()
    with torch.no_grad():
        scores = model.exit_scores(batch, model.depth, "loss")
        logits = model.mlm(input_ids=batch["input_ids"]).logits
    labels = full_labels(batch)
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    masked = labels != -100
    expected = (token_loss * masked).sum(1) / masked.sum(1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_every_exit_layer_scores_each_sample():
    model, batch = tiny_model(), masked_batch()
    with torch.no_grad():
        for k in range(1, model.depth + 1):
            for criterion in ("loss", "entropy"):
                s = model.exit_scores(batch, k, criterion)
                assert s.shape == (6,) and torch.isfinite(s).all() and (s > 0).all()
        early, exact = model.exit_scores(batch, 1, "loss"), model.exit_scores(batch, 3, "loss")
    assert not torch.allclose(early, exact)  # layer 1 is an approximation, not the exact loss


def test_entropy_score_is_the_mean_predictive_entropy_at_masked_positions():
    model, batch = tiny_model(), masked_batch()
    with torch.no_grad():
        scores = model.exit_scores(batch, model.depth, "entropy")
        logp = torch.log_softmax(model.mlm(input_ids=batch["input_ids"]).logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    masked = full_labels(batch) != -100
    assert torch.allclose(scores, (entropy * masked).sum(1) / masked.sum(1), atol=1e-5)


def test_evaluate_sums_reduce_exactly_across_batches():
    model, batch = tiny_model(), masked_batch()
    whole = model.evaluate(batch)
    halves = [model.evaluate({k: v[s] for k, v in batch.items()}) for s in (slice(0, 3), slice(3, 6))]
    for key in whole:
        assert torch.allclose(whole[key].float(), sum(h[key] for h in halves).float(), atol=1e-4)
    assert whole["count"] == batch["mask_labels"].numel()
    assert torch.allclose(whole["loss_sum"] / whole["count"], model.loss(batch), atol=1e-5)
