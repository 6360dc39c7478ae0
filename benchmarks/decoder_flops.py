"""The decoder's cheap pass against its training step, in model FLOPs (FlopCounterMode), for GPT-2 small.

Per window of 1,024 tokens at GPT-2's 50,257-token vocabulary: the scoring pass up to exit k (the LM head
included), and a vanilla step's forward and backward. FLOPs grow with the batch alike, so one window is enough;
SIFT's floor relative to a vanilla step is their ratio + frac.

    python benchmarks/decoder_flops.py              # exit 1, every position and 128 of them
    python benchmarks/decoder_flops.py --exit 2 --positions 64
"""

from __future__ import annotations

import argparse

import torch

from sift_cli.hardware import count_flops
from sift_cli.models.decoder import CausalLM

VOCAB, LENGTH = 50257, 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exit", type=int, default=1)
    parser.add_argument("--positions", type=int, nargs="*", default=[128], help="score_positions besides all")
    parser.add_argument("--frac", type=float, default=0.5)
    args = parser.parse_args()
    batch = {"input_ids": torch.randint(0, VOCAB, (1, LENGTH + 1), generator=torch.Generator().manual_seed(0))}
    step = None
    for positions in [None, *args.positions]:
        model = CausalLM(VOCAB, LENGTH, score_positions=positions)  # the defaults are GPT-2 small's
        with torch.no_grad():
            cheap = count_flops(lambda: model.exit_scores(batch, args.exit, "loss"))
        step = step or count_flops(lambda: model.loss(batch).backward())
        print(f"GPT-2 small, exit {args.exit}, score_positions={positions}: cheap pass {cheap / 1e9:,.1f} GFLOP, "
              f"vanilla step {step / 1e9:,.1f} GFLOP per window: {cheap / step:.3f} of a step; "
              f"SIFT floor at frac {args.frac:g}: {cheap / step + args.frac:.3f}")


if __name__ == "__main__":
    main()
