"""In-process A/B of SGDD batch-1 decoding with float32 denormals flushed to zero (stop 31:
`decode_vectors` runs inside `sampling.denormals.flush_denormals`, new) against the same code
without it (before), alternating per sentence in one process, so the machine's drift hits both
alike. CFG 0 and 2, 30 held-out sentences, each decoded 4 times per version, its fastest kept.

    OMP_NUM_THREADS=T python docs/results/sgdd/denormals_ab.py RUN T
"""

import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch

from difflm.evaluate import sgdd_decode
from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples

torch.set_num_threads(int(sys.argv[2]))
pre = load_pretrained(sys.argv[1])
pairs = split_examples(pre.config, "val")[:30]
data = build_examples(pairs, load_encoder(pre.config.model.encoder), pre.tokenizer, pre.config, 128)


def before(vectors, scale):
    with mock.patch.object(sgdd_decode, "flush_denormals", nullcontext):
        return decode_vectors(pre, vectors, cfg_scale=scale)


def new(vectors, scale):
    return decode_vectors(pre, vectors, cfg_scale=scale)


for scale in (0.0, 2.0):
    best: dict = {}
    before(data.vectors[:1], scale), new(data.vectors[:1], scale)  # warm-up
    for rep in range(4):
        for i in range(len(pairs)):
            for name in ("new", "before") if (rep + i) % 2 else ("before", "new"):
                start = time.perf_counter()
                out = (new if name == "new" else before)(data.vectors[i : i + 1], scale)[0]
                ms = 1000 * (time.perf_counter() - start)
                best[(name, i)] = (min(best.get((name, i), (float("inf"),))[0], ms), out)
    mean = {
        name: sum(best[(name, i)][0] for i in range(len(pairs))) / len(pairs) for name in ("before", "new")
    }
    same = sum(best[("new", i)][1] == best[("before", i)][1] for i in range(len(pairs)))
    print(
        f"CFG {scale:g}: denormals kept {mean['before']:.1f} ms   flushed {mean['new']:.1f} ms   "
        f"({mean['before'] / mean['new']:.2f}x)   same text {same} / {len(pairs)}",
        flush=True,
    )
