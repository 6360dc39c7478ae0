"""Decoder language models (GPT-2, Llama-style, any local HF causal LM), behind the model contract.

A batch holds `input_ids` [B, L+1]: packed windows of L+1 tokens, the first L the input and the last L the
next-token targets. The model is transformers' own (GPT2LMHeadModel and LlamaForCausalLM built from config,
or whatever AutoModelForCausalLM loads from a folder). The cheap pass runs the model's embeddings and its
first k decoder blocks, preparing positions and attention as the model's own forward does, then an exit head:
the model's final norm and LM head (the logit lens, no new parameters), or with exit_head=tuned a per-layer
affine translator before them (the tuned lens, Belrose et al. 2023, arXiv 2303.08112), trained on detached
hidden states to match the final layer's distribution. The LM head over a large vocabulary is the cheap
pass's largest cost, so `score_positions` scores a fixed number of evenly spaced positions per sequence.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sift_cli.config import ConfigError, first_line
from sift_cli.selection import prediction_scores

ARCHS = ("gpt2", "llama")
EXIT_HEADS = ("lens", "tuned")
SUPPORTED = "GPT-2, GPT-NeoX (Pythia), Llama, Mistral, Qwen2, Gemma, Phi and their likes"
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")  # GPT-2; Llama, Qwen2; GPT-NeoX; Phi
EMBEDDING_DROPOUTS = ("drop", "emb_dropout", "embed_dropout")  # GPT-2; GPT-NeoX; Phi (Llama has none)


def load_pretrained(path: str) -> nn.Module:
    try:  # fp32 master weights whatever the checkpoint's dtype: autocast gives the matrix products bf16
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    except Exception as err:  # missing files, an encoder's config, no SDPA support: each its own exception type
        raise ConfigError(f"model.pretrained={path} could not be loaded as a causal language model "
                          f"(a folder written by save_pretrained that AutoModelForCausalLM loads): "
                          f"{first_line(err)}") from None


def from_config(arch: str, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int,
                num_kv_heads: Optional[int], intermediate_size: Optional[int], max_position: int,
                dropout: float) -> nn.Module:
    """Random weights, as in pre-training; input and output embeddings tied (GPT-2, small Llamas)."""
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                            n_inner=intermediate_size, n_positions=max_position, resid_pdrop=dropout,
                            embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None, eos_token_id=None)
        model_class = GPT2LMHeadModel
    else:  # RMSNorm, rotary positions, SwiGLU
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                             intermediate_size=intermediate_size or 4 * hidden_size,
                             max_position_embeddings=max_position, attention_dropout=dropout,
                             tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
        model_class = LlamaForCausalLM
    config._attn_implementation = "sdpa"
    return model_class(config)


def _named(module: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    """The first of `names` that is a submodule of `module`."""
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


class CausalLM(nn.Module):
    task = "causal"

    def __init__(self, vocab_size: int, seq_len: int, arch: str = "gpt2", num_layers: int = 12,
                 hidden_size: int = 768, num_heads: int = 12, num_kv_heads: Optional[int] = None,
                 intermediate_size: Optional[int] = None, max_position: int = 1024, dropout: float = 0.0,
                 exit_head: str = "lens", score_positions: Optional[int] = None, pretrained: Optional[str] = None):
        super().__init__()
        for key, value, allowed in (("arch", arch, ARCHS), ("exit_head", exit_head, EXIT_HEADS)):
            if value not in allowed:
                raise ConfigError(f"model.{key}={value} is not allowed; choose one of: {', '.join(allowed)}")
        sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
                 "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size, "max_position": max_position,
                 "score_positions": score_positions}
        for key, size in sizes.items():
            if size is not None and size < 1:
                raise ConfigError(f"model.{key}={size} must be at least 1")
        if score_positions is not None and score_positions > seq_len:
            raise ConfigError(f"model.score_positions={score_positions} is more than the {seq_len} positions of a "
                              f"sequence (data.seq_len); use 1..{seq_len}, or null to score every position")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout={dropout} is not allowed; use a probability in [0, 1), e.g. 0.0")
        self.lm = load_pretrained(pretrained) if pretrained else from_config(
            arch, vocab_size, num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size, max_position,
            dropout)
        config, base = self.lm.config, self.lm.base_model
        self.depth = config.num_hidden_layers
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # the pieces of the model's own forward, by the names transformers' decoders give them (names, not
        # modules: a module kept here would be registered twice, and saved twice)
        self._parts = {"blocks": next((n for n, m in base.named_children()
                                       if isinstance(m, nn.ModuleList) and len(m) == self.depth), None),
                       "norm": _named(base, FINAL_NORMS), "embed_dropout": _named(base, EMBEDDING_DROPOUTS),
                       "learned_positions": _named(base, ("wpe",)),  # GPT-2
                       "rotary": _named(base, ("rotary_emb",))}  # Llama, Qwen2, GPT-NeoX: computed once, passed on
        # scored positions: evenly spaced, built once (static shapes); all of them by default
        count = score_positions or seq_len
        self.register_buffer("positions", torch.linspace(0, seq_len - 1, count).round().long(), persistent=False)
        self.translators = None
        if exit_head == "tuned":  # one affine map per exit below the top, identity to start: the logit lens
            self.translators = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                             for _ in range(self.depth - 1))
            for t in self.translators:
                nn.init.eye_(t.weight)
                nn.init.zeros_(t.bias)
        self._check_blocks(pretrained)
        if pretrained and vocab_size > config.vocab_size:
            raise ConfigError(f"model.pretrained={pretrained} has {config.vocab_size:,} token embeddings but the "
                              f"data's tokenizer has {vocab_size:,} tokens; use the tokenizer of the same folder")

    def save_pretrained(self, folder) -> None:
        """The model as transformers saves it: AutoModelForCausalLM loads it, and model.pretrained takes it back
        (tuned exits' translators are sift-train's, not the model's: they stay behind)."""
        self.lm.save_pretrained(folder)

    def _check_blocks(self, pretrained: Optional[str]) -> None:
        """The blocks run one by one must give the model's own logits: an architecture that prepares its
        hidden states or logits otherwise (Cohere's scaled logits, soft-capped logits, ALiBi) is refused, not
        approximated."""
        what = f"model.pretrained={pretrained}" if pretrained else "this model"
        name = f"{type(self.lm).__name__} ({self.lm.config.model_type})"
        if None in (self._parts["blocks"], self._parts["norm"], self.lm.get_output_embeddings()):
            raise ConfigError(f"{what} is a {name} whose decoder blocks, final norm or LM head sift-train cannot "
                              f"find; supported: {SUPPORTED}")
        ids = torch.arange(min(8, self.max_length or 8)).unsqueeze(0) % self.lm.config.vocab_size
        ids = ids.to(self.lm.device)
        with torch.no_grad(), self.scoring_mode():
            own = self.lm(input_ids=ids).logits
            ours = self._logits(self._hidden(ids, self.depth)[-1], self.depth)
        if not torch.allclose(own, ours, rtol=1e-4, atol=1e-4 * own.abs().max().item()):
            raise ConfigError(f"{what} is a {name} whose blocks, run one by one, do not reproduce its own logits; "
                              f"supported: {SUPPORTED}")

    def _part(self, name: str) -> Optional[nn.Module]:
        found = self._parts[name]
        return None if found is None else getattr(self.lm.base_model, found)

    def _hidden(self, inputs: Tensor, k: int) -> list[Tensor]:
        """The hidden states after each of blocks 1..k. Sequences are packed, without padding, so no mask
        is built: SDPA's is_causal (what transformers' attention uses when given none) is the causal mask."""
        h = self.lm.get_input_embeddings()(inputs)
        position_ids = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)
        learned, dropout, rotary = (self._part(n) for n in ("learned_positions", "embed_dropout", "rotary"))
        extra = {}
        if learned is not None:
            h = h + learned(position_ids)
        if dropout is not None:
            h = dropout(h)
        if rotary is not None:
            extra["position_embeddings"] = rotary(h, position_ids=position_ids)
        states = []
        for block in self._part("blocks")[:k]:
            h = block(h, attention_mask=None, position_ids=position_ids, **extra)
            h = h[0] if isinstance(h, tuple) else h  # transformers 4 returns a tuple, 5 a tensor
            states.append(h)
        return states

    def _logits(self, h: Tensor, k: int, frozen: bool = False) -> Tensor:
        """Exit k's logits: (exit k's translator, then) the model's final norm and LM head. Frozen: the norm and
        head read detached weights, so a tuned translator's loss reaches the translator alone."""
        if self.translators is not None and k < self.depth:
            h = self.translators[k - 1](h)
        norm, head = self._part("norm"), self.lm.get_output_embeddings()
        if frozen:
            return functional_call(head, {n: p.detach() for n, p in head.named_parameters()},
                                   (functional_call(norm, {n: p.detach() for n, p in norm.named_parameters()}, (h,)),))
        return head(norm(h))

    @contextlib.contextmanager
    def scoring_mode(self, score_bn: Optional[str] = None):
        """The cheap pass's mode: dropout off (no batch norm, so score_bn has no say here)."""
        self.eval()
        try:
            yield
        finally:
            self.train()

    def exit_scores(self, batch: dict, k: int, criterion: str, features: bool = False):
        """Mean next-token score over each row's scored positions, from block k; with features, also the
        mean-pooled hidden state."""
        ids = batch["input_ids"]
        h = self._hidden(ids[:, :-1], k)[-1]
        logits = self._logits(h[:, self.positions], k)
        targets = ids[:, 1:][:, self.positions]
        scores = prediction_scores(logits.flatten(0, 1), targets.flatten(), criterion).view(targets.shape).mean(1)
        return (scores, h.float().mean(1)) if features else scores

    def loss(self, batch: dict) -> Tensor:
        """Mean next-token cross-entropy. With tuned exits, their KL divergence to the final layer's distribution
        at the scored positions rides along for the translators' gradients only, as ResNet's exit heads do:
        `main + (heads - heads.detach())` has the main loss's value."""
        ids = batch["input_ids"]
        states = self._hidden(ids[:, :-1], self.depth)
        logits = self._logits(states[-1], self.depth)
        main = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        if self.translators is None:
            return main
        target = logits[:, self.positions].detach().float().log_softmax(-1).flatten(0, 1)
        heads = sum(F.kl_div(self._logits(h[:, self.positions].detach(), k, frozen=True).float()
                             .log_softmax(-1).flatten(0, 1), target, log_target=True, reduction="batchmean")
                    for k, h in enumerate(states[:-1], 1))
        return main + (heads - heads.detach())

    def forward(self, batch: dict) -> Tensor:
        """The training loss: DistributedDataParallel and torch.compile wrap the module's call."""
        return self.loss(batch)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, Tensor]:
        """Sums over every next-token prediction: val_acc is next-token accuracy, exp(val_loss) the perplexity."""
        ids = batch["input_ids"]
        logits = self._logits(self._hidden(ids[:, :-1], self.depth)[-1], self.depth).flatten(0, 1).float()
        targets = ids[:, 1:].flatten()
        return {
            "loss_sum": F.cross_entropy(logits, targets, reduction="sum"),
            "correct": (logits.argmax(-1) == targets).sum(),
            "count": torch.tensor(targets.numel(), device=targets.device),
        }
