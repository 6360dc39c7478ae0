python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# SIFT on one GPU within one device call (at most 10 min): the step cost of BERT-base at 256x128 eager
# and compiled under CUDA graphs (host syncs, GPU kernel time and busy share, MFU, the kernels outside matrix
# products, whether the compiled step trains as the eager one), then a time-to-accuracy race of vanilla,
# SIFT (from step 0, and with selection windows), random, exact and Composer's SelectiveBackprop under CUDA
# graphs, one seed after another until the budget runs out (each seed's report is complete). The first line brings hydra-core, omegaconf and antlr4 from the wheels in .whl/ (the lent
# machine lacks them; `pip download` them, see benchmarks/README.md); the repo is the working directory.
#
#   bash benchmarks/gpu.sh [all|step|race|big|autotune|decoder|decoder-race]   all (default): step, then race;
#                            big: BERT-base at 512x128, CUDA graphs only (~2 min); autotune: BERT-base at 256x128
#                            compiled with max-autotune (tuned GEMMs, GELU fusable into them: does MFU pass 0.40?
#                            minutes); decoder: GPT-2 small's step cost at 16x1024 eager and under CUDA graphs, then
#                            its race if the budget still holds a seed; decoder-race: that race alone
#   GPU_BUDGET_S=550         seconds this call may take in all (the device tool's limit is 600 per call)
#   RACE_SET="trainer.compile=false trainer.compile_mode=null"   overrides for every run of the race (this one
#                            races eagerly, as results/gpu-h200/ did); RACE_CORPUS_MB=100: the race's corpus;
#                            RACE_ARMS=vanilla,sift-loss,random: the arms raced (time_to_accuracy.py's names)
#   DECODER_SET="..."        overrides for the decoder's step cost and race (experiment=tta_gpu_gpt2 on the race's
#                            corpus); DECODER_ARMS=vanilla,sift-loss,random; DECODER_RACE_S=90: seconds per arm
#   GPU_DRY=1 OUT=/tmp/out PATH=$PWD/.venv/bin:$PATH bash -c 'sed 1d benchmarks/gpu.sh | bash -s -- all'
#       a rehearsal on the CPU with bert_tiny and tiny batches: every command runs, in a few minutes
set -euo pipefail
OUT=${OUT:?set OUT to the folder for results}
PART=${1:-all}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 SIFT_CACHE=${SIFT_CACHE:-/tmp/sift-cache}
deadline=$((SECONDS + ${GPU_BUDGET_S:-550}))
left() { local s=$((deadline - SECONDS - $1)); echo $((s > 1 ? s : 1)); }  # seconds to the deadline, less a margin

# eager and under CUDA graphs (compile_mode=auto on one GPU); the default compile mode was measured before
# (results/gpu-h100-static/), and every compiled fit() traces anew (fit() resets torch.compile's caches at its
# end, as a sweep needs): ~20 s each the first time, seconds once inductor's cache on disk holds its kernels.
# One repetition: the compiled arms' two repetitions in results/gpu-h200-lpln/ agreed within 2%
step=(--model bert:256x128 --exits 1 --fracs 0.5 --reps 1 --warmup 3 --steps 10 --max-profiles 0
      --compile off,reduce-overhead --device cuda)
big=(--model bert:512x128 --exits 1 --fracs 0.5 --reps 1 --warmup 3 --steps 10 --max-profiles 0
     --compile reduce-overhead --device cuda)
autotune=(--model bert:256x128 --exits 1 --fracs 0.5 --reps 1 --warmup 3 --steps 10 --max-profiles 0
          --compile max-autotune --device cuda)
# the race: experiment=tta_gpu (BERT-Small at 256x128, 20 s per arm, CUDA graphs; BERT-base does not leave its
# first plateau in 40 s) on this machine's Python sources, more than a race can memorise (see tta_gpu.yaml)
corpus_file=/tmp/race-corpus.txt corpus_mb=${RACE_CORPUS_MB:-100}
race=("data.paths=[$corpus_file]" ${RACE_SET:-})
# the arms of the selection-window race (README: When to select): SIFT from step 0, after a tenth of the budget and
# in Composer's window, Composer's SelectiveBackprop itself, and the exact loss; RACE_ARMS=... to choose
race_args=(--experiment tta_gpu --arms "${RACE_ARMS:-vanilla,sift-loss,random,sift-loss-w0.1,sift-loss-w0.5-0.9-every2,composer,exact}"
           --lrs 1e-3)
# the decoder (README: Decoders): GPT-2 small from scratch at 16x1024 with GPT-2's vocabulary size, SIFT scoring 128
# positions per window, as experiment=tta_gpu_gpt2 (paper_gpt2 at half its batch) sets it, on the race's corpus
decoder_data=(experiment=tta_gpu_gpt2 "data.paths=[$corpus_file]" ${DECODER_SET:-})
decoder=(--model gpt2:16x1024 --exits 1 --fracs 0.5 --reps 1 --warmup 3 --steps 10 --max-profiles 0
         --compile off,reduce-overhead --device cuda)
decoder_arms=${DECODER_ARMS:-vanilla,sift-loss,random} decoder_race_s=${DECODER_RACE_S:-90}
decoder_race=("data.paths=[$corpus_file]" "trainer.max_time_s=$decoder_race_s" ${DECODER_SET:-})
if [[ -n "${GPU_DRY:-}" ]]; then  # the same commands on the CPU, small enough to finish in minutes
  step=(--model bert_tiny:4x32 --exits 1 --fracs 0.5 --reps 2 --warmup 1 --steps 2 --max-profiles 0
        --compile off,reduce-overhead --diagnose --device cpu)
  big=(--model bert_tiny:8x32 --exits 1 --fracs 0.5 --reps 1 --warmup 1 --steps 2 --max-profiles 0
       --compile reduce-overhead --diagnose --device cpu)
  autotune=(--model bert_tiny:4x32 --exits 1 --fracs 0.5 --reps 1 --warmup 1 --steps 2 --max-profiles 0
            --compile max-autotune --diagnose --device cpu)
  race+=(model=bert_tiny trainer.batch_size=8 trainer.max_time_s=4 trainer.eval_every_s=2 trainer.device=cpu
         data.seq_len=32 data.max_val_samples=16)
  decoder=(--model gpt2_tiny:4x32 --exits 1 --fracs 0.5 --reps 2 --warmup 1 --steps 2 --max-profiles 0
           --compile off,reduce-overhead --diagnose --device cpu)
  decoder_data+=(data.vocab_size=512 model.score_positions=16)
  decoder_race_s=4
  decoder_race+=(model=gpt2_tiny trainer.batch_size=8 trainer.max_time_s=4 trainer.eval_every_s=2 trainer.device=cpu
                 data.seq_len=32 data.max_val_samples=16 data.vocab_size=512 model.score_positions=16)
  corpus_mb=${RACE_CORPUS_MB:-2}
  # a rehearsal starts afresh: the race keeps finished runs, which would not run again
  rm -rf /tmp/tta-gpu /tmp/tta-gpu-gpt2 "$corpus_file"
else
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv"
fi
python3 -c "import hydra, omegaconf, torch, transformers; print('hydra', hydra.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

# the race's corpus is written (once per machine: a rewrite would change its date, and the cache would miss) and
# tokenised as the overrides ($@, an experiment among them) ask (about a minute, then cached), on half the cores so
# that the host-bound eager steps timed beside it keep theirs
tokenise() {
  RAYON_NUM_THREADS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 )) python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from common import app_config; from data_pipeline import make_corpus; from hydra.utils import instantiate; \
corpus = Path(sys.argv[1]); corpus.exists() or print(make_corpus(corpus, float(sys.argv[2]))); \
instantiate(app_config(sys.argv[3:]).data)" "$corpus_file" "$corpus_mb" "$@"
}
# $1: the runs' suffix (folder /tmp/tta-gpu$1; files in $OUT), $2: the seconds a seed needs at least, then
# time_to_accuracy.py's arguments. One seed more per call, in the same folder (finished runs are kept): each
# call's report covers every seed so far, and a call cut short by the deadline leaves the previous report standing
race_seeds() {
  local suffix=$1 need=$2 seeds="" seed
  shift 2
  for seed in 0 1 2; do
    seeds+="${seeds:+,}$seed"
    (( $(left 20) > need )) || { echo "race$suffix: no time for seed $seed"; break; }
    timeout "$(left 20)" python3 benchmarks/time_to_accuracy.py "$@" --seeds "$seeds" --runs-dir "/tmp/tta-gpu$suffix" \
      --plots "/tmp/tta-gpu$suffix/plots" --out "$OUT/time_to_accuracy$suffix.md" > "$OUT/race$suffix.log" 2>&1 \
      || { echo "race$suffix with seeds $seeds: exit $?"; tail -3 "$OUT/race$suffix.log"; break; }
    echo "race$suffix: seeds $seeds done"
  done
  cp "/tmp/tta-gpu$suffix/plots/accuracy_vs_time.png" "$OUT/accuracy_vs_time$suffix.png" 2>/dev/null || true
  [[ ! -d "/tmp/tta-gpu$suffix" ]] ||  # metrics, summaries, logs
    tar -czf "$OUT/tta_runs$suffix.tar.gz" --exclude=checkpoints -C /tmp "tta-gpu$suffix" || true
  sed -n '/^## Comparison/,/^## The same runs/p' "$OUT/time_to_accuracy$suffix.md" 2>/dev/null || true
}

if [[ $PART == all || $PART == race ]]; then  # tokenised while the GPU times steps
  tokenise experiment=tta_gpu "${race[@]}" > /tmp/corpus.log 2>&1 & corpus=$!
fi

if [[ $PART == all || $PART == step ]]; then
  # vanilla, the hand-written loops, random and SIFT (k=1, frac 0.5): eager, and compiled with CUDA graphs
  timeout "$(left 200)" python3 benchmarks/step_cost.py "${step[@]}" --out "$OUT/step_cost.md" || echo "step cost: exit $?"
  grep -A5 "Against issue 14" "$OUT/step_cost.md" || true  # the verdict, in the call's output
fi
if [[ $PART == big ]]; then
  timeout "$(left 10)" python3 benchmarks/step_cost.py "${big[@]}" --out "$OUT/step_cost-512.md" || echo "step cost: exit $?"
  grep -A4 "Against issue 14" "$OUT/step_cost-512.md" || true
fi
if [[ $PART == autotune ]]; then
  timeout "$(left 10)" python3 benchmarks/step_cost.py "${autotune[@]}" --out "$OUT/step_cost-autotune.md" || echo "step cost: exit $?"
  grep -A4 "Against issue 14" "$OUT/step_cost-autotune.md" || true
fi

if [[ $PART == all || $PART == race ]]; then
  wait "$corpus" || { echo "gpu.sh: building the race's corpus failed:"; tail -5 /tmp/corpus.log; exit 1; }
  race_seeds "" 60 "${race_args[@]}" "${race[@]}"
fi

if [[ $PART == decoder || $PART == decoder-race ]]; then
  # the race's corpus, tokenised with a vocabulary of GPT-2's size (the step cost's data too): nothing to overlap
  # with it (about two minutes on 8 cores, then cached)
  tokenise "${decoder_data[@]}" > /tmp/corpus-gpt2.log 2>&1 \
    || { echo "gpu.sh: building the decoder's corpus failed:"; tail -5 /tmp/corpus-gpt2.log; exit 1; }
fi
if [[ $PART == decoder ]]; then
  # vanilla, the hand-written loops (transformers' own labels= loss for textbook), random and SIFT (k=1, frac 0.5)
  sets=()
  for override in "${decoder_data[@]}"; do sets+=(--set "$override"); done
  timeout "$(left 10)" python3 benchmarks/step_cost.py "${decoder[@]}" "${sets[@]}" --out "$OUT/step_cost-gpt2.md" \
    || echo "decoder step cost: exit $?"
  grep -A5 "Against issue 14" "$OUT/step_cost-gpt2.md" || true
fi
if [[ $PART == decoder || $PART == decoder-race ]]; then
  # each arm: its training budget, and about a minute to load, compile (CUDA graphs) and evaluate
  commas=${decoder_arms//[^,]/}  # one arm more than commas
  race_seeds -gpt2 $(( (${#commas} + 1) * (decoder_race_s + 60) )) \
    --experiment tta_gpu_gpt2 --arms "$decoder_arms" --lrs 6e-4 "${decoder_race[@]}"
fi
ls -l "$OUT"
