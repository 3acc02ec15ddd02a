#!/usr/bin/env bash
# SGDD end to end on CPU: phase 1 (reconstruct sentences from their MiniLM vector), phase 2
# (paraphrase QQP pairs, starting from phase 1), evaluation and sampling. Run from the repo root.
# The corpus embeddings are computed once and cached under data.cache_dir (the first run's
# encoding pass is the slow part on CPU); later runs and epochs load them.
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs}

# Phase 1: all 42k sentences (500 held out, seeded), lightweight decoder (256 / 2 layers / 4 heads,
# 4 memory tokens, whitened vectors). ~52 min on one core of a 2-core CPU in bf16.
difflm train sgdd_phase1 data.path=$DATA/sentences_en.txt \
  train.max_steps=8000 train.warmup_steps=200 train.eval_every=1000 train.eval_batches=8 \
  train.save_every=1000 train.precision=bf16 train.output_dir=$OUT/sgdd_p1

# Held-out exact match / token accuracy / BLEU / chrF / cosine, with and without guidance;
# then the same on 500 training sentences (memorisation check).
difflm eval $OUT/sgdd_p1 --batch-size 64 --precision bf16 --json
difflm eval $OUT/sgdd_p1 --batch-size 64 --precision bf16 --split train --json

# Phase 2: QQP paraphrase pairs (300 held out), both directions, initialised from phase 1.
difflm train sgdd_phase2 data.path=$DATA/qqp_pairs.jsonl system.init_from=$OUT/sgdd_p1 \
  train.max_steps=600 train.warmup_steps=50 train.eval_every=200 train.eval_batches=4 \
  train.save_every=200 train.precision=bf16 train.output_dir=$OUT/sgdd_p2
difflm eval $OUT/sgdd_p2 --batch-size 64 --precision bf16 --json

# Reconstruct / paraphrase a text, and decode halfway between two sentences' vectors.
difflm sample $OUT/sgdd_p1 --text "The old man walked slowly to the station."
difflm sample $OUT/sgdd_p2 --text "How can I learn to cook quickly?" --cfg-scale 2.0
difflm sample $OUT/sgdd_p1 --interpolate "The cat sat on the mat." "A storm hit the coast." --alpha 0.5
