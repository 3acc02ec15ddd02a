"""A/B of precomputed conditioning in SGDD decoding: the AdaLN modulations (at every t a row can
have) and the memory tokens' keys/values computed once per decode (new) against recomputed at
every forward (the old path, forced: `SGDD.conditioning` gives none). Batch 1,
held-out sentences, one thread; each sentence is decoded `--repeats` times by each path,
alternating, and its fastest time kept (the least disturbed by anything else on the machine).
Run from the repository root with a finished SGDD run:

    OMP_NUM_THREADS=1 python docs/results/sgdd/conditioning_ab.py --run RUN > docs/results/sgdd/conditioning_ab.txt
"""

import argparse
import time

import torch

from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.models.sgdd import SGDD
from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples

p = argparse.ArgumentParser()
p.add_argument("--run", required=True, help="an SGDD run folder or checkpoint (the lightweight decoder)")
p.add_argument("--sentences", type=int, default=30)
p.add_argument("--repeats", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(1)
pre = load_pretrained(args.run)
pairs = split_examples(pre.config, "val")[: args.sentences]
data = build_examples(pairs, load_encoder(pre.config.model.encoder), pre.tokenizer, pre.config, 128)
n = len(pairs)
paths = {"recomputed": lambda self, vectors, t_grid=None: None, "precomputed": SGDD.conditioning}
print(f"{args.run}: {n} held-out sentences (mean {data.lengths.float().mean():.1f} tokens), batch 1, 1 thread, fp32")
for scale in (0.0, 2.0):
    fastest = {name: [float("inf")] * n for name in paths}
    texts = {name: [None] * n for name in paths}
    with torch.no_grad():
        for repeat in range(args.repeats):
            order = list(paths) if repeat % 2 else list(paths)[::-1]
            for i in range(n):
                for name in order:
                    SGDD.conditioning = paths[name]
                    start = time.perf_counter()
                    texts[name][i] = decode_vectors(pre, data.vectors[i : i + 1], cfg_scale=scale)[0]
                    fastest[name][i] = min(fastest[name][i], 1000 * (time.perf_counter() - start))
    ms = {name: round(sum(times) / n, 1) for name, times in fastest.items()}
    same = sum(a == b for a, b in zip(texts["recomputed"], texts["precomputed"], strict=True))
    ratio = ms["recomputed"] / ms["precomputed"]
    print(f"CFG {scale:g}: ms per sentence {ms} ({ratio:.2f}x); same text in {same}/{n} sentences")
