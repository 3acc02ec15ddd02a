"""In-process A/B of the guided shortlist forward (stop 28): its unconditional rows stacked into it
(new) or run at the decode's first step (separate, as before), alternating per sentence in one
process, so the machine's drift between processes and minutes hits both alike. CFG 2, batch 1,
30 held-out sentences, each decoded 6 times per version, its fastest kept.

    OMP_NUM_THREADS=T python docs/results/sgdd/stack_ab.py RUN T

It swaps `sgdd_decode.shortlist_logits`, which stop 32 replaced by `shortlist` (hidden states in
place of logits): run it on a checkout of 21b5e30 or earlier.
"""

import sys
import time

import torch

import difflm.evaluate.sgdd_decode as decode
from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples

torch.set_num_threads(int(sys.argv[2]))
pre = load_pretrained(sys.argv[1])
pairs = split_examples(pre.config, "val")[:30]
data = build_examples(pairs, load_encoder(pre.config.model.encoder), pre.tokenizer, pre.config, 128)
stacked = decode.shortlist_logits


def separate(pre, vectors, ids, fill, k, bias=None, extra=None, uncond_rows=None):
    return stacked(pre, vectors, ids, fill, k, bias, extra, None)  # the unconditional rows run later


best: dict = {}
with torch.no_grad():
    decode.decode_vectors(pre, data.vectors[:1], cfg_scale=2.0)  # warm-up
    for rep in range(6):
        for i in range(len(pairs)):
            for name in ("stacked", "separate") if (rep + i) % 2 else ("separate", "stacked"):
                decode.shortlist_logits = stacked if name == "stacked" else separate
                start = time.perf_counter()
                out = decode.decode_vectors(pre, data.vectors[i : i + 1], cfg_scale=2.0)[0]
                ms = 1000 * (time.perf_counter() - start)
                best[(name, i)] = (min(best.get((name, i), (float("inf"),))[0], ms), out)
for name in ("separate", "stacked"):
    print(name, "CFG 2: %.1f ms" % (sum(best[(name, i)][0] for i in range(len(pairs))) / len(pairs)))
same = sum(best[("stacked", i)][1] == best[("separate", i)][1] for i in range(len(pairs)))
print("same text", same, "/", len(pairs))
