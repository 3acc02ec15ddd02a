#!/usr/bin/env bash
# Sampling speed (median of five runs) against OpenMP threads and wait policy, on a quiet machine and next to a busy
# process (one core spinning), and one training step at 1 and 2 threads:
#
#   benchmarks/threads.sh [CHECKPOINT]     # default zoo/shakespeare_char_bd3_4_from_ar
#
# `difflm sample` (96 characters after "ROMEO:", batch 1, exact block cache, left to right) sets
# OMP_WAIT_POLICY=PASSIVE itself unless it is set: the ACTIVE rows are the spinning default it replaces.
set -euo pipefail
CKPT=${1:-zoo/shakespeare_char_bd3_4_from_ar}
PY=${PYTHON:-python}

tok_s() {  # env settings... -> median tokens/s of five sample runs
  for _ in 1 2 3 4 5; do
    env "$@" $PY -m difflm.cli sample "$CKPT" --prompt ROMEO: --gen-length 96 --cache prefix \
      --remasking left_to_right --json 2>/dev/null | tail -1
  done | $PY -c "import json, statistics, sys; print(round(statistics.median(json.loads(l)['run']['tokens_per_second'] for l in sys.stdin)))"
}

table() {
  echo "| machine | OMP_NUM_THREADS=1 | 2 threads, ACTIVE wait | 2 threads, PASSIVE wait |"
  echo "| --- | --- | --- | --- |"
  for load in quiet busy; do
    if [ $load = busy ]; then $PY -c "while True: pass" & spin=$!; sleep 1; fi
    one=$(tok_s OMP_NUM_THREADS=1)
    active=$(tok_s OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE)
    passive=$(tok_s OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE)
    if [ $load = busy ]; then kill $spin; fi
    echo "| $load (tok/s) | $one | $active | $passive |"
  done
}

echo "sampling, $CKPT:"
table
echo
echo "training step (benchmarks/train_step.py --small --precision fp32), autoregressive row:"
for n in 1 2; do
  echo "OMP_NUM_THREADS=$n: $(OMP_NUM_THREADS=$n $PY benchmarks/train_step.py --small --precision fp32 --steps 6 --warmup 2 | grep '^autoregressive')"
done
