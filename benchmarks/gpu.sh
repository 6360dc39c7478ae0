python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# SIFT on one GPU in about 7 minutes: step cost at full batch, then a short time-to-accuracy race.
# The first line brings hydra-core, omegaconf and antlr4 from the wheels in .whl/ (the lent machine
# lacks them); the repo is the working directory, not installed.
#
#   bash benchmarks/gpu.sh [all|mini|base]       results in $OUT (6 files, flat)
#       mini: step cost of bert_mini at 128x128 and the race with bert_mini
#       base: step cost of bert (BERT-base) at 64x128 and the race with bert
#       all (default): step cost of both and of bert at 256x128 (nearer compute-bound), the race with bert_mini
#   GPU_DRY=1 OUT=/tmp/out PATH=$PWD/.venv/bin:$PATH bash benchmarks/gpu.sh
#       a rehearsal on the CPU with bert_tiny and tiny batches: every command runs, in about a minute
set -euo pipefail
SIZE=${1:-all}
OUT=${OUT:?set OUT to the folder for results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1

case "$SIZE" in
  mini) step_models=(--model bert_mini:128x128); race=(model=bert_mini trainer.batch_size=128) ;;
  base) step_models=(--model bert:64x128); race=(model=bert trainer.batch_size=64 trainer.optimizer.lr=3e-4) ;;
  all)  step_models=(--model bert_mini:128x128 --model bert:64x128 --model bert:256x128)
        race=(model=bert_mini trainer.batch_size=128) ;;
  *) echo "gpu.sh: size must be all, mini or base, not '$SIZE'" >&2; exit 2 ;;
esac
step_args=(--exits 1,L --fracs 0.5 --reps 5 --warmup 3 --steps 10 --max-profiles 2 --device cuda)
race_args=(--experiment tta_gpu --arms vanilla,sift-loss,random --seeds 0 --lrs 1e-3)
if [[ -n "${GPU_DRY:-}" ]]; then  # the same commands on the CPU, small enough to finish in minutes
  step_models=(--model bert_tiny:4x32)
  step_args=(--exits 1,L --fracs 0.5 --reps 1 --warmup 1 --steps 1 --max-profiles 1 --device cpu)
  race=(model=bert_tiny trainer.batch_size=8 trainer.max_time_s=6 trainer.eval_every_s=2 trainer.device=cpu
        data.seq_len=32 data.max_val_samples=16)
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

# 1. step cost: vanilla, the hand-written loops, random and SIFT at k=1 and k=L, frac 0.5
timeout 240 python3 benchmarks/step_cost.py "${step_models[@]}" "${step_args[@]}" --out "$OUT/step_cost.md"
wait "$corpus" || { echo "gpu.sh: building the race's corpus failed:"; tail -5 "$OUT/corpus.log"; exit 1; }

# 2. time to accuracy: vanilla, SIFT (loss, k=1, frac 0.5) and random (frac 0.5), one seed, 60 s each
timeout 300 python3 benchmarks/time_to_accuracy.py "${race_args[@]}" --runs-dir /tmp/tta-gpu \
  --plots /tmp/tta-gpu/plots --out "$OUT/time_to_accuracy.md" "${race[@]}"
tar -czf "$OUT/tta_runs.tar.gz" -C /tmp tta-gpu  # every run's metrics, summary and log; the plots
ls -l "$OUT"
