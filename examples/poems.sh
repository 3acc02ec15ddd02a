#!/usr/bin/env bash
# Poem completion, end to end on CPU: seeded split -> prefix-diffusion model and AR baseline (same
# size, same poems, same steps) -> the benchmark table/CSV/plot -> a side-by-side generation GIF.
#
#   examples/poems.sh POEMS_JSONL WORK_DIR [STEPS]
#
# POEMS_JSONL: the poem corpus, a JSONL file of {title, author, content} (never copied here).
# WORK_DIR: where the split, both runs and the benchmark outputs go.
# STEPS: optimizer steps of each run (default 80; the recipes' schedule is 160 steps and
# train.stop_at_step stops both runs at the same point of it, as in the reported run).
set -euo pipefail
SRC=${1:?usage: examples/poems.sh POEMS_JSONL WORK_DIR [STEPS]}
WORK=${2:?usage: examples/poems.sh POEMS_JSONL WORK_DIR [STEPS]}
STEPS=${3:-80}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core per run: both runs train side by side

difflm data build-poems "$SRC" "$WORK/split" --seed 0

for recipe in poems_prefix_diffusion poems_ar; do
  difflm train "recipes/$recipe.yaml" data.path="$WORK/split" train.output_dir="$WORK/$recipe" \
    train.stop_at_step="$STEPS" train.progress=false train.log_every=10 > "$WORK/$recipe.log" 2>&1 &
done
wait

# The table: 100 test poems x 6 ratios; diffusion fills with 10 denoising steps (the seed's count), AR left to right.
difflm eval poem-completion --diffusion "$WORK/poems_prefix_diffusion" --ar "$WORK/poems_ar" \
  --split-dir "$WORK/split" --out-dir "$WORK/poem_completion" --n-poems 100 \
  --ratios 0.1,0.2,0.3,0.4,0.5,0.6 --seed 0 --denoise-steps 10 --candidates 0 --batch-size 100
# The AR "both sides" row (top-3 candidates rescored by the whole-poem likelihood) costs
# candidates x masked positions forward passes: on a shared 2-core CPU, run it on fewer poems.
difflm eval poem-completion --diffusion "$WORK/poems_prefix_diffusion" --ar "$WORK/poems_ar" \
  --split-dir "$WORK/split" --out-dir "$WORK/poem_completion_rescored" --n-poems 20 \
  --ratios 0.1,0.2,0.3,0.4,0.5,0.6 --seed 0 --denoise-steps 10 --candidates 3 --batch-size 20

# The seed's generation: prompt in the first 16 positions, 10 steps, top-k 50 / top-p 0.95,
# resample-then-remask (--mode resample) or keep-revealed (--mode keep); AR on the same prompt.
difflm compare "$WORK/poems_prefix_diffusion" "$WORK/poems_ar" --prompt "我想在春天的早晨醒来/" \
  --gen-length 64 --steps 10 --top-k 50 --top-p 0.95 --mode resample --out "$WORK/compare.gif"
difflm sample "$WORK/poems_prefix_diffusion" --prompt "我想在春天的早晨醒来/" --gen-length 64 \
  --steps 10 --temperature 1.0 --top-k 50 --top-p 0.95 --mode keep --animate "$WORK/sample.gif"
