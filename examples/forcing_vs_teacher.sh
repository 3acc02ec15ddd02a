#!/usr/bin/env bash
# Teacher Forcing vs Diffusion Forcing on Tiny Shakespeare, CPU-sized: the exact commands of the
# comparison in the Diffusion Forcing report (same DFGPT, same size, data, steps and seed; only
# model.use_diffusion_forcing differs).  Both runs go in the background (1 thread each, logs in
# $OUT/*.log); then the TF checkpoint judges both sets of continuations.
# Full nanoGPT size: drop the model/data/train overrides below (recipes give 6x6x384, block 256, 5000 steps).
set -euo pipefail
DATA=${DATA:-shakespeare}  # a corpus name (found locally, see the README) or a file
OUT=${OUT:-runs/forcing_vs_teacher}
SMALL="data.path=$DATA data.cache_dir=$OUT/cache model.n_layer=4 model.n_head=4 model.n_embd=128
  model.dropout=0.0 data.block_size=128 train.batch_size=32 train.max_steps=300 train.warmup_steps=30
  train.precision=fp32 train.device=cpu train.eval_every=100 train.eval_batches=4 train.save_every=100
  train.keep_last=0 train.progress=false train.log_every=10"
mkdir -p "$OUT"

for system in tf df; do
  OMP_NUM_THREADS=1 difflm train recipes/shakespeare_char_$system.yaml $SMALL \
    train.output_dir=$OUT/$system > "$OUT/$system.log" 2>&1 &
done
wait

# metrics of each checkpoint (the TF model judges the DF continuations)
difflm eval $OUT/tf --max-batches 20 --continuations 8 --gen-length 256 --json
difflm eval $OUT/df --judge $OUT/tf --max-batches 20 --continuations 8 --gen-length 256 --json

# the side-by-side table and plot (DF sampled with 20 DDIM steps, pyramid, horizon 16)
python benchmarks/forcing_vs_teacher.py --tf $OUT/tf --df $OUT/df --max-batches 20 \
  --continuations 8 --gen-length 256 --sampling-timesteps 20 --horizon 16 --schedule pyramid \
  --plot $OUT/forcing_vs_teacher.png --json $OUT/forcing_vs_teacher.json

# samples, traced and animated
difflm sample $OUT/tf --prompt "ROMEO:" --gen-length 200 --temperature 0.8 --animate $OUT/tf.html
difflm sample $OUT/df --prompt "ROMEO:" --gen-length 200 --schedule pyramid --horizon 16 --steps 20 \
  --animate $OUT/df.gif
