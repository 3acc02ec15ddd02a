#!/usr/bin/env bash
# AR -> diffusion with a Qwen3-shaped model on a CPU (docs/results/qwen3_ar_to_diffusion):
# a causal Qwen3 pretrained on WikiText-2 (test split) by next-token prediction, converted into a
# Qwen3-LLaDA with `difflm convert`, then trained with the masked-diffusion loss; next to it the
# same Qwen3-LLaDA trained from random init for the same diffusion steps, and the converted model
# trained under block attention. Everything is written under OUT (never the repo).
#
#   examples/qwen3_ar_to_diffusion.sh OUT DATA_DIR
#
# DATA_DIR holds wikitext2_test.txt and paws_pairs.jsonl (the tokenizer of examples/qwen3_llada_small.sh).
# AR_STEPS / DIFF_STEPS (environment) set the step counts. fp32: bf16 pays only on CPUs with AVX512-BF16.
set -euo pipefail

OUT=${1:?usage: $0 OUT DATA_DIR}
DATA=${2:?usage: $0 OUT DATA_DIR}
AR_STEPS=${AR_STEPS:-1500}
DIFF_STEPS=${DIFF_STEPS:-1000}
mkdir -p "$OUT"
python examples/bpe_tokenizer.py "$OUT" "$DATA"
TEXT=(data.path="$DATA/wikitext2_test.txt" data.cache_dir="$OUT/cache" train.progress=false)

# 1. The AR model, to the best validation loss (train.keep_best).
difflm train recipes/qwen3_ar_pretrain.yaml "${TEXT[@]}" data.tokenizer="$OUT/tokenizer" \
  train.max_steps="$AR_STEPS" train.output_dir="$OUT/ar"

# 2. Its best checkpoint (a Hugging Face Qwen3 folder) converted into Qwen3-LLaDA.
[ -d "$OUT/converted" ] || difflm convert --from qwen3 "$OUT/ar/checkpoints/best" "$OUT/converted"

# 3. Masked diffusion from the converted model, from random init, and from the converted model
#    under block attention (blocks of 32, each seeing the earlier ones): same data, steps, schedule.
DIFF=(recipes/qwen3_llada_pretrain.yaml "${TEXT[@]}" data.tokenizer="$OUT/converted"
  train.max_steps="$DIFF_STEPS" train.precision=fp32 train.lr=1e-3 train.min_lr=1e-4 train.warmup_steps=50
  train.eval_every=100 train.eval_batches=8 train.save_every=100 train.keep_last=1)
difflm train "${DIFF[@]}" model.init_from="$OUT/converted" train.output_dir="$OUT/from_ar"
difflm train "${DIFF[@]}" train.output_dir="$OUT/scratch"
difflm train "${DIFF[@]}" model.init_from="$OUT/converted" system.block_attention=true \
  train.output_dir="$OUT/from_ar_block"

# 4. The bound of each on the whole validation split (full attention), and a sample of each.
for run in ar from_ar scratch from_ar_block; do
  difflm eval "$OUT/$run" --json > "$OUT/$run.eval.json"
done
for run in from_ar scratch from_ar_block; do
  difflm sample "$OUT/$run" --prompt "The game" --gen-length 64 --steps 64 --block-length 32 --seed 0
done
difflm sample "$OUT/ar" --prompt "The game" --gen-length 64 --temperature 0.8 --seed 0
