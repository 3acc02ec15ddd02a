"""A/B of the waiting-rows fix: rows that finished their block ride along in the block's window (new)
against a gathered copy of the active rows' KV cache (the old path, forced); BD3 K=4 with its cache
and threshold 0.9, batch 16, two runs of each, alternating, one thread. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/results/sampling/rows_ab.py > docs/results/sampling/rows_ab.txt
"""

import time

import torch

from difflm.data.corpora import resolve_corpus
from difflm.pretrained import load_pretrained
from difflm.sampling.cache import BlockForward
from difflm.sampling.unmask import SampleConfig, generate

torch.set_num_threads(1)
bd3 = load_pretrained("zoo/shakespeare_char_bd3_4_1k")
text = resolve_corpus("shakespeare").read_text(encoding="utf-8")
tail = text[int(len(text) * 0.9) :]
ids = torch.tensor([bd3.tokenizer.encode(tail[i * 1000 : i * 1000 + 32]) for i in range(16)])
paths = {"gather": lambda self: False, "ride": BlockForward.feeds_block_only}
for G in (256, 1024):
    cfg = SampleConfig(gen_length=G, steps=G, block_length=4, block_causal=True, cache="prefix", threshold=0.9)
    speed, tokens = {name: [] for name in paths}, {name: [] for name in paths}
    with torch.no_grad():
        for _ in range(2):
            for name, feeds_block_only in paths.items():
                BlockForward.feeds_block_only = feeds_block_only
                start = time.perf_counter()
                out = generate(bd3.model, ids, cfg).tokens
                speed[name].append(round(16 * G / (time.perf_counter() - start)))
                tokens[name].append(out)
    same = all(torch.equal(a, b) for a, b in zip(tokens["gather"], tokens["ride"], strict=True))
    print(f"gen {G}, batch 16: tok/s {speed}; identical tokens: {same}")
