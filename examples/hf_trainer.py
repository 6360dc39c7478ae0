"""Fine-tune a tiny BERT with SIFT inside a Hugging Face Trainer, offline, on a local text file.

    pip install 'sift-train[hf]'
    python examples/hf_trainer.py --text my_corpus.txt --out hf-run     # well under a minute on a laptop CPU

The model is built from a config (no download); the text is tokenised by sift-train's data pipeline (a WordPiece
tokenizer trained on the file, sequences packed and masked as the CLI does), and SiftTrainer back-propagates the
--frac of each batch with the highest loss at encoder layer --exit-layer. The model and tokenizer are saved with
save_pretrained into --out/hf, loadable by AutoModelForMaskedLM and AutoTokenizer without sift-train.

Decoders: once sift-train has its causal-LM family (issue 32), this example gains a --model gpt2 switch that builds
a tiny GPT2LMHeadModel from a GPT2Config in the same way; SiftTrainer takes it through sift_cli.api.ADAPTERS.
"""

import argparse
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM, TrainingArguments

from sift_cli.data.text import text_files
from sift_cli.hf import SiftTrainer, TrainRows

README = Path(__file__).resolve().parents[1] / "README.md"  # a local text that is always there


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(README), help="a local text file (default: this repo's README)")
    parser.add_argument("--out", default="hf-run", help="output folder: Trainer state, then the model in OUT/hf")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--exit-layer", type=int, default=1)
    parser.add_argument("--criterion", default="loss")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--report-to", default="none", help="e.g. wandb: the selection counts are logged there too")
    a = parser.parse_args()

    data = text_files(paths=[a.text], seq_len=a.seq_len, vocab_size=a.vocab_size, val_fraction=0.1,
                      max_val_samples=128, num_workers=0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(data.tokenizer), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=256, max_position_embeddings=a.seq_len))
    validation = [{k: v[i] for k, v in b.items()} for b in data.val_batches(64) for i in range(len(b["input_ids"]))]
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=64, learning_rate=1e-3, warmup_steps=max(1, a.steps // 10),
                             logging_steps=max(1, a.steps // 10), eval_strategy="steps",
                             eval_steps=max(1, a.steps // 2), save_strategy="no", report_to=a.report_to,
                             disable_tqdm=True, use_cpu=True)
    trainer = SiftTrainer(model, args, train_dataset=TrainRows(data), eval_dataset=validation,
                          exit_layer=a.exit_layer, frac=a.frac, criterion=a.criterion)
    trainer.train()
    print(f"validation loss {trainer.evaluate()['eval_loss']:.4f}")
    folder = Path(a.out) / "hf"
    model.save_pretrained(folder)  # the user's own model: SiftTrainer trained it through an adapter
    data.tokenizer.save_pretrained(folder)
    print(f"saved to {folder}: AutoModelForMaskedLM.from_pretrained({str(folder)!r})")


if __name__ == "__main__":
    main()
