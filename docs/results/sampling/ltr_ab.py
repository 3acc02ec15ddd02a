"""A/B of the left-to-right reveal: the leftmost n masks taken directly (`cand & cumsum <= n`, new)
against ranking every candidate by minus its column and keeping the top n (the old path, re-created
here), with the old and new prefix rule of threshold decoding. BD3 K=4 zoo model, its exact cache,
batch 1, gen 256, one thread; three alternating rounds, best of three runs each. Run from the
repository root:

    OMP_NUM_THREADS=1 python docs/results/sampling/ltr_ab.py > docs/results/sampling/ltr_ab.txt
"""

import time

import torch

from difflm.data.corpora import resolve_corpus
from difflm.pretrained import load_pretrained
from difflm.sampling import draw, unmask
from difflm.sampling.unmask import SampleConfig, generate


def old_reveal(conf, cand, n, cfg, generator):
    scores = -torch.arange(conf.shape[1], dtype=torch.float64).expand(conf.shape)
    return unmask._top_n(scores, cand, n)


def old_threshold_count(conf, cand, threshold, *, prefix=False):
    sure = cand & (conf >= threshold)
    unsure = cand & ~sure
    first = torch.where(unsure.any(1), unsure.long().argmax(1), cand.shape[1])
    cols = torch.arange(cand.shape[1])
    return (sure & (cols[None, :] < first[:, None])).sum(1)


torch.set_num_threads(1)
bd3 = load_pretrained("zoo/shakespeare_char_bd3_4_1k")
text = resolve_corpus("shakespeare").read_text(encoding="utf-8")
ids = torch.tensor([bd3.tokenizer.encode(text[int(len(text) * 0.9) :][:32])])
paths = {"old": (old_reveal, old_threshold_count), "new": (unmask._reveal, draw.threshold_count)}
for tau in (0.9, 0.3):
    cfg = SampleConfig(
        gen_length=256, steps=0, block_length=4, block_causal=True, cache="prefix",
        threshold=tau, remasking="left_to_right",
    )  # fmt: skip
    speed, tokens = {name: [] for name in paths}, {}
    with torch.no_grad():
        for _ in range(3):
            for name, (reveal, count) in paths.items():
                unmask._reveal, unmask.threshold_count = reveal, count
                best = 0.0
                for _ in range(3):
                    start = time.perf_counter()
                    out = generate(bd3.model, ids, cfg)
                    best = max(best, 256 / (time.perf_counter() - start))
                speed[name].append(round(best))
                tokens[name] = out.tokens
    same = torch.equal(tokens["old"], tokens["new"])
    print(f"threshold {tau}: tok/s {speed}; {out.forward_passes} forwards; identical tokens: {same}")
