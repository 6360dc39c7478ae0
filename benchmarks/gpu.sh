python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# SIFT on one GPU in about 8 minutes: the step cost of BERT-base at 256x128 (compile off and on, host
# syncs counted, MFU), then a short time-to-accuracy race at the same size, where steps are compute-bound.
# The first line brings hydra-core, omegaconf and antlr4 from the wheels in .whl/ (the lent machine
# lacks them; `pip download` them, see benchmarks/README.md); the repo is the working directory.
#
#   bash benchmarks/gpu.sh                   results in $OUT (flat)
#   GPU_DRY=1 OUT=/tmp/out PATH=$PWD/.venv/bin:$PATH bash benchmarks/gpu.sh
#       a rehearsal on the CPU with bert_tiny and tiny batches: every command runs, in a few minutes
set -euo pipefail
OUT=${OUT:?set OUT to the folder for results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 SIFT_CACHE=${SIFT_CACHE:-/tmp/sift-cache}

# the race shares the step-cost benchmark's shapes (batch, length, vocabulary), so inductor's cache
# of the compiled graphs serves both
step=(--model bert:256x128 --exits 1 --fracs 0.5 --reps 2 --warmup 3 --steps 10 --max-profiles 0 --compile both
      --device cuda)
race=(model=bert trainer.batch_size=256 data.vocab_size=8192 data.seq_len=128 trainer.max_time_s=40
      trainer.eval_every_s=4 trainer.warmup=4)
race_args=(--experiment tta_gpu --arms vanilla,sift-loss,random --seeds 0 --lrs 3e-4)
budget=(300 270)
if [[ -n "${GPU_DRY:-}" ]]; then  # the same commands on the CPU, small enough to finish in minutes
  step=(--model bert_tiny:4x32 --exits 1 --fracs 0.5 --reps 1 --warmup 1 --steps 2 --max-profiles 0 --compile both
        --device cpu)
  race=(model=bert_tiny trainer.batch_size=8 trainer.max_time_s=6 trainer.eval_every_s=2 trainer.device=cpu
        data.seq_len=32 data.max_val_samples=16 trainer.compile=false)
  budget=(600 600)
else
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv"
fi
python3 -c "import hydra, omegaconf, torch, transformers; print('hydra', hydra.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

# the race's corpus (docstrings of torch and transformers: about a minute of parsing, then cached)
# is built on the CPU while the GPU times steps
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import app_config; \
from hydra.utils import instantiate; instantiate(app_config(['experiment=tta_gpu', *sys.argv[1:]]).data)" \
  "${race[@]}" > "$OUT/corpus.log" 2>&1 & corpus=$!

# 1. step cost: vanilla, the hand-written loops, random and SIFT (k=1, frac 0.5), eager and compiled
timeout "${budget[0]}" python3 benchmarks/step_cost.py "${step[@]}" --out "$OUT/step_cost.md" || echo "step cost: exit $?"
wait "$corpus" || { echo "gpu.sh: building the race's corpus failed:"; tail -5 "$OUT/corpus.log"; exit 1; }

# 2. time to accuracy: vanilla, SIFT (loss, k=1, frac 0.5) and random (frac 0.5), one seed each
timeout "${budget[1]}" python3 benchmarks/time_to_accuracy.py "${race_args[@]}" --runs-dir /tmp/tta-gpu \
  --plots /tmp/tta-gpu/plots --out "$OUT/time_to_accuracy.md" "${race[@]}" || echo "race: exit $?"
cp /tmp/tta-gpu/plots/accuracy_vs_time.png "$OUT/" 2>/dev/null || true
tar -czf "$OUT/tta_runs.tar.gz" --exclude=checkpoints -C /tmp tta-gpu  # metrics, summaries, logs
ls -l "$OUT"
