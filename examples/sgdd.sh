#!/usr/bin/env bash
# SGDD end to end on CPU: phase 1 (reconstruct sentences from their MiniLM vector), phase 2
# (paraphrase QQP pairs, starting from phase 1), evaluation and sampling. Run from the repo root.
# The corpus embeddings are computed once and cached under data.cache_dir (the first run's
# encoding pass is the slow part on CPU); later runs and epochs load them.
#
#   examples/sgdd.sh DATA_DIR [OUT]
#
# DATA_DIR holds sentences_en.txt (one sentence a line) and qqp_pairs.jsonl (paraphrase pairs);
# OUT (default runs) receives the run folders.
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${1:?usage: $0 DATA_DIR [OUT]}
OUT=${2:-runs}

# Phase 1, the decoder that starts out knowing English: a BERT stack shaped like MiniLM and started
# from its weights (model.decoder=encoder), 3600 steps in length-grouped batches; 87 min on both
# cores of a 2-core CPU (fp32, OMP_NUM_THREADS=2, nothing else running).
difflm train sgdd_phase1_minilm data.path=$DATA/sentences_en.txt train.output_dir=$OUT/sgdd_p1

# The seed's lightweight from-scratch decoder (256 / 2 layers / 4 heads, 4 memory tokens, whitened
# vectors) for comparison at equal CPU time: 4000 steps, 72 min on the other core.
difflm train sgdd_phase1 data.path=$DATA/sentences_en.txt model.block_size=32 train.precision=fp32 \
  train.max_steps=4000 train.eval_every=250 train.save_every=250 train.output_dir=$OUT/sgdd_p1_scratch

# Held-out exact match / token accuracy / BLEU / chrF / cosine, with and without guidance, plain and
# with semantic verification (best of 4 candidates, 2 correction rounds); the memorisation check on
# training sentences; any file of sentences of your own.
difflm eval $OUT/sgdd_p1 --batch-size 50 --json
difflm eval $OUT/sgdd_p1 --batch-size 50 --best-of 4 --rounds 2 --json
difflm eval $OUT/sgdd_p1 --batch-size 50 --cfg-scale 0 --best-of 4 --search 12 --fluency 0.001 --json   # best-first edit search over single-token edits (--search-patience 3), answered with the fluency stage
difflm eval $OUT/sgdd_p1 --batch-size 50 --split train --json
printf 'The old man walked slowly to the station.\nIt rained all day.\n' > $OUT/mine.txt
difflm eval $OUT/sgdd_p1 --data $OUT/mine.txt --json

# The phase-1 table of the README (both decoders, verification grid, curves, samples).
python benchmarks/sgdd.py --run minilm=$OUT/sgdd_p1 --run scratch=$OUT/sgdd_p1_scratch --out $OUT/sgdd_results

# Phase 2: QQP paraphrase pairs (300 held out), both directions, initialised from phase 1.
difflm train sgdd_phase2 data.path=$DATA/qqp_pairs.jsonl system.init_from=$OUT/sgdd_p1 \
  model.decoder=encoder model.block_size=32 train.precision=fp32 \
  train.max_steps=600 train.warmup_steps=50 train.eval_every=200 train.eval_batches=4 \
  train.save_every=200 train.output_dir=$OUT/sgdd_p2
difflm eval $OUT/sgdd_p2 --batch-size 50 --json   # with the copy-the-input baseline

# Reconstruct / paraphrase a text, and decode halfway between two sentences' vectors.
difflm sample $OUT/sgdd_p1 --text "The old man walked slowly to the station." --best-of 4 --rounds 2
difflm sample $OUT/sgdd_p2 --text "How can I learn to cook quickly?" --cfg-scale 2.0
difflm sample $OUT/sgdd_p1 --interpolate "The cat sat on the mat." "A storm hit the coast." --alpha 0.5
