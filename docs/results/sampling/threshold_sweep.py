"""How far BD3 K=4 (zoo, exact cache, left to right) gets with looser thresholds: tokens per
forward, tok/s and gen-ppl (judged by the AR zoo model) against the AR model with its KV cache, gen
256, batch 1 and 16, greedy, one thread, prompts of 32 characters from the held-out tail (as
benchmarks/sampling.py picks them); tok/s is the best of three runs. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/results/sampling/threshold_sweep.py > docs/results/sampling/threshold_sweep.txt
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from sampling import gen_ppl, prompts  # noqa: E402

from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.sampling.autoregressive import generate_ar  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate  # noqa: E402

G, P = 256, 32
torch.set_num_threads(1)
bd3, ar = load_pretrained("zoo/shakespeare_char_bd3_4_1k"), load_pretrained("zoo/shakespeare_char_ar_1k")


def best_of_three(run, B):
    best, out = 0.0, None
    for _ in range(3):
        start = time.perf_counter()
        out = run()
        best = max(best, B * G / (time.perf_counter() - start))
    return out, best


print("| batch | method | tok/s | vs AR | forwards | tokens/forward | gen-ppl |")
print("| --- | --- | --- | --- | --- | --- | --- |")
with torch.no_grad():
    for B in (1, 16):
        ids = prompts(bd3.tokenizer, B, P)
        res, ar_tps = best_of_three(lambda ids=ids: generate_ar(ar.model, ids, max_new_tokens=G), B)
        ppl = gen_ppl(ar.model, res.tokens, P, P + G)
        print(f"| {B} | AR (KV cache) | {ar_tps:.0f} | 1.00x | {res.forward_passes} | 1.00 | {ppl:.2f} |")
        for tau in (0.9, 0.7, 0.5, 0.4, 0.3):
            cfg = SampleConfig(
                gen_length=G, steps=0, block_length=4, block_causal=True, cache="prefix",
                threshold=tau, remasking="left_to_right",
            )  # fmt: skip
            res, tps = best_of_three(lambda cfg=cfg, ids=ids: generate(bd3.model, ids, cfg), B)
            ppl, fwd = gen_ppl(ar.model, res.tokens, P, P + G), res.forward_passes
            print(f"| {B} | BD3 K=4, left to right, threshold {tau} | {tps:.0f} | {tps / ar_tps:.2f}x | {fwd} "
                  f"| {G / fwd:.2f} | {ppl:.2f} |")  # fmt: skip
