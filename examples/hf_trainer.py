"""Fine-tune a tiny causal LM (or a tiny BERT) with SIFT inside a Hugging Face Trainer, offline, on a local text file.

    pip install 'sift-train[hf]'
    python examples/hf_trainer.py --text my_corpus.txt --out hf-run                  # GPT-2, under a minute on a CPU
    python examples/hf_trainer.py --model bert --text my_corpus.txt --out hf-run     # BERT, masked tokens

The model is built from a transformers config (no download): a 2-block GPT2LMHeadModel, or a BertForMaskedLM with
--model bert. The text is tokenised by sift-train's data pipeline (a tokenizer trained on the file, documents
packed into windows of --seq-len tokens, masked as the CLI does for BERT), and SiftTrainer back-propagates the
--frac of each batch with the highest loss at block --exit-layer (the logit lens for the GPT-2: its own final
norm and LM head). --selection-start/--selection-end/--selection-every restrict selection to a window of the
steps, as the CLI's selection.start/end/every do. The model and tokenizer are saved with save_pretrained into
OUT/hf, which AutoModelForCausalLM (AutoModelForMaskedLM) and AutoTokenizer load without sift-train.
"""

import argparse
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, TrainingArguments

from sift_cli.data import causal, text
from sift_cli.hf import SiftTrainer, TrainRows

README = Path(__file__).resolve().parents[1] / "README.md"  # a local text that is always there


def build(kind: str, vocab_size: int, seq_len: int):
    """The user's own model, from a config: random weights, no download."""
    if kind == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=256,
                                          max_position_embeddings=seq_len))
    # no bos/eos ids: GPT-2's default (50256) lies outside this tokenizer's vocabulary
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=2, n_inner=256,
                                      n_positions=seq_len, bos_token_id=None, eos_token_id=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("gpt2", "bert"), default="gpt2")
    parser.add_argument("--text", default=str(README), help="a local text file (default: this repo's README)")
    parser.add_argument("--out", default="hf-run", help="output folder: Trainer state, then the model in OUT/hf")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--exit-layer", type=int, default=1)
    parser.add_argument("--criterion", default="loss")
    parser.add_argument("--selection-start", type=float, default=0.0)
    parser.add_argument("--selection-end", type=float, default=1.0)
    parser.add_argument("--selection-every", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--report-to", default="none", help="e.g. wandb: the selection counts are logged there too")
    a = parser.parse_args()

    source = text if a.model == "bert" else causal  # masked sequences, or windows and their next tokens
    data = source.text_files(paths=[a.text], seq_len=a.seq_len, vocab_size=a.vocab_size, val_fraction=0.1,
                             max_val_samples=128, num_workers=0)
    model = build(a.model, len(data.tokenizer), a.seq_len)
    validation = [{k: v[i] for k, v in b.items()} for b in data.val_batches(64) for i in range(len(b["input_ids"]))]
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=64, learning_rate=1e-3, warmup_steps=max(1, a.steps // 10),
                             logging_steps=max(1, a.steps // 10), eval_strategy="steps",
                             eval_steps=max(1, a.steps // 2), save_strategy="no", report_to=a.report_to,
                             disable_tqdm=True, use_cpu=True)
    trainer = SiftTrainer(model, args, train_dataset=TrainRows(data), eval_dataset=validation,
                          exit_layer=a.exit_layer, frac=a.frac, criterion=a.criterion,
                          selection_start=a.selection_start, selection_end=a.selection_end,
                          selection_every=a.selection_every)
    trainer.train()
    print(f"validation loss {trainer.evaluate()['eval_loss']:.4f}")
    folder = Path(a.out) / "hf"
    model.save_pretrained(folder)  # the user's own model: SiftTrainer trained it through an adapter
    data.tokenizer.save_pretrained(folder)
    auto = "AutoModelForMaskedLM" if a.model == "bert" else "AutoModelForCausalLM"
    print(f"saved to {folder}: {auto}.from_pretrained({str(folder)!r})")


if __name__ == "__main__":
    main()
