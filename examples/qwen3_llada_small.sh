#!/usr/bin/env bash
# Qwen3-LLaDA end to end at toy scale on a CPU: a small BPE tokenizer, masked-diffusion
# pretraining on WikiText-2 (test split), SFT on PAWS paraphrase pairs turned into conversations
# ("Paraphrase: A" -> B), then chat sampling. Everything is written under OUT (never the repo).
#
#   examples/qwen3_llada_small.sh OUT DATA_DIR
#
# DATA_DIR holds wikitext2_test.txt and paws_pairs.jsonl. Run it from
# the repository root (it reads recipes/). PRE_STEPS / SFT_STEPS (environment) set the step
# counts; the defaults kept each run under ~15 minutes on a 2-core CPU shared with other jobs
# (~10 s a step in bf16 on a CPU without AVX512-BF16, where PRECISION=fp32 takes ~0.5 s); the
# recipes' own 600 / 300 steps suit an idle machine.
set -euo pipefail

OUT=${1:?usage: $0 OUT DATA_DIR}
DATA=${2:?usage: $0 OUT DATA_DIR}
PRE_STEPS=${PRE_STEPS:-64}
SFT_STEPS=${SFT_STEPS:-80}
PRECISION=${PRECISION:-bf16}
mkdir -p "$OUT"

# 1. A 4096-token byte-level BPE tokenizer with the specials difflm needs (an HF tokenizer folder).
python examples/bpe_tokenizer.py "$OUT" "$DATA"

# 2. PAWS pairs as HF conversations, shuffled with a fixed seed (the last 5% are the SFT val split).
python - "$OUT" "$DATA" <<'PY'
import json, random, sys
from pathlib import Path

out, data = Path(sys.argv[1]), Path(sys.argv[2])
pairs = [json.loads(l) for l in (data / "paws_pairs.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
random.Random(0).shuffle(pairs)
with open(out / "paws_conversations.jsonl", "w", encoding="utf-8") as f:
    for pair in pairs:
        turns = [{"from": "human", "value": "Paraphrase: " + pair["source"]}, {"from": "gpt", "value": pair["target"]}]
        f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
print(f"conversations: {len(pairs)} -> {out / 'paws_conversations.jsonl'}")
PY

# 3. Pretraining: WikiText-2 packed into 128-token blocks (a 4-layer, 128-wide Qwen3).
difflm train recipes/qwen3_llada_pretrain.yaml \
  data.path="$DATA/wikitext2_test.txt" data.tokenizer="$OUT/tokenizer" data.cache_dir="$OUT/cache" \
  train.output_dir="$OUT/pretrain" train.max_steps="$PRE_STEPS" train.warmup_steps=6 \
  train.eval_every=32 train.eval_batches=4 train.save_every=32 train.log_every=4 train.progress=false \
  train.precision="$PRECISION" train.device=cpu

# 4. SFT from the last pretraining checkpoint (its own tokenizer), on the conversations.
difflm train recipes/qwen3_llada_sft.yaml \
  model.init_from="$OUT/pretrain/checkpoints/step-$PRE_STEPS" data.tokenizer="$OUT/pretrain/checkpoints/step-$PRE_STEPS" \
  data.path="$OUT/paws_conversations.jsonl" \
  train.output_dir="$OUT/sft" train.max_steps="$SFT_STEPS" train.warmup_steps=6 \
  train.eval_every=30 train.eval_batches=4 train.save_every=30 train.log_every=4 train.progress=false \
  train.precision="$PRECISION" train.device=cpu

# 5. Chat samples on three held-out (val split) sources.
tail -n 3 "$OUT/paws_conversations.jsonl" | python -c '
import json, sys
for line in sys.stdin:
    print(json.loads(line)["conversations"][0]["value"])' > "$OUT/prompts.txt"
difflm sample "$OUT/sft" --chat --prompt-file "$OUT/prompts.txt" --gen-length 48 --steps 48 --block-length 16
