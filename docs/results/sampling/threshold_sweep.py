"""How far BD3 K=4 (zoo, exact cache, left to right) gets with looser thresholds: tokens per
forward, tok/s and gen-ppl (judged by the AR zoo model) against the AR model with its KV cache, gen
256, batch 1 and 16, greedy, one thread, prompts of 32 characters from the held-out tail (as
benchmarks/sampling.py picks them). This machine's speed drifts by tens of percent from minute to
minute, so the runs are interleaved: every BD3 run follows an AR run, N of each per threshold (default
3); a setting's tok/s is its best run, the AR model's is its best run of the whole sweep. Run from the
repository root:

    OMP_NUM_THREADS=1 python docs/results/sampling/threshold_sweep.py [N] [BATCH ...] > docs/results/sampling/threshold_sweep.txt

`--bd3 PATH` / `--ar PATH` sweep other checkpoints (defaults: the zoo's 1056-context models),
`--taus` other thresholds.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from sampling import gen_ppl, prompts  # noqa: E402

from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.sampling.autoregressive import generate_ar  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("n", nargs="?", type=int, default=3, help="runs of each setting (its best is kept)")
p.add_argument("batches", nargs="*", type=int, default=[1, 16])
p.add_argument("--bd3", default="zoo/shakespeare_char_bd3_4_1k")
p.add_argument("--ar", default="zoo/shakespeare_char_ar_1k")
p.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.4, 0.3])
args = p.parse_args()
G, P, N, BATCHES, TAUS = 256, 32, args.n, args.batches, args.taus
torch.set_num_threads(1)
bd3, ar = load_pretrained(args.bd3), load_pretrained(args.ar)


def tok_s(run, B):
    start = time.perf_counter()
    out = run()
    return out, B * G / (time.perf_counter() - start)


print("| batch | method | tok/s | vs AR | forwards | tokens/forward | gen-ppl |")
print("| --- | --- | --- | --- | --- | --- | --- |")
with torch.no_grad():
    for B in BATCHES:
        ids = prompts(bd3.tokenizer, B, P)
        ar_best, rows = 0.0, []
        for tau in TAUS:
            cfg = SampleConfig(
                gen_length=G, steps=0, block_length=4, block_causal=True, cache="prefix",
                threshold=tau, remasking="left_to_right",
            )  # fmt: skip
            best = 0.0
            for _ in range(N):
                ar_res, ar_tps = tok_s(lambda ids=ids: generate_ar(ar.model, ids, max_new_tokens=G), B)
                res, tps = tok_s(lambda cfg=cfg, ids=ids: generate(bd3.model, ids, cfg), B)
                ar_best, best = max(ar_best, ar_tps), max(best, tps)
            rows.append((tau, best, res))
        ppl = gen_ppl(ar.model, ar_res.tokens, P, P + G)
        print(f"| {B} | AR (KV cache) | {ar_best:.0f} | 1.00x | {ar_res.forward_passes} | 1.00 | {ppl:.2f} |")
        for tau, tps, res in rows:
            ppl, fwd = gen_ppl(ar.model, res.tokens, P, P + G), res.forward_passes
            print(f"| {B} | BD3 K=4, left to right, threshold {tau} | {tps:.0f} | {tps / ar_best:.2f}x | {fwd} "
                  f"| {G / fwd:.2f} | {ppl:.2f} |")  # fmt: skip
