"""BD3 K=4 before and after certainty distillation against the AR model with its KV cache: gen 256
after 32-character prompts from the held-out tail (as benchmarks/sampling.py picks them), greedy,
left to right inside each block, exact block cache, thresholds 0.9 / 0.7 / 0.5, one thread; at batch
16 with the rows going apart (each row moves to its next block when its own is filled) and kept in
step (every row waits for the block's slowest).

Columns: tok/s (best of N runs, every BD3 run right after an AR run, as this machine's speed drifts
from minute to minute; the AR figure is its best of the whole batch size), forwards, tokens per
forward, gen-ppl judged by the AR model, how many characters a row writes before its first difference from the AR model's greedy text
(mean over rows; 256 = all), and the share of generated words found in the corpus. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/results/distill/sweep.py [N] --json docs/results/distill/sweep.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from sampling import DATA, gen_ppl, prompts  # noqa: E402

from difflm.evaluate.metrics import word_quality, words  # noqa: E402
from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.sampling.autoregressive import generate_ar  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("n", nargs="?", type=int, default=3, help="runs of each setting (its best is kept)")
p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
p.add_argument("--ar", default="zoo/shakespeare_char_ar_1k")
p.add_argument("--bd3", nargs="+", default=["zoo/shakespeare_char_bd3_4_1k", "zoo/shakespeare_char_bd3_4_distilled"])
p.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.7, 0.5])
p.add_argument("--json", help="also write every figure here")
args = p.parse_args()
G, P = 256, 32
torch.set_num_threads(1)
ar = load_pretrained(args.ar)
students = {path: load_pretrained(path) for path in args.bd3}
vocabulary = set(words(Path(DATA).read_text(encoding="utf-8")))


def timed(run, B):
    start = time.perf_counter()
    out = run()
    return out, B * G / (time.perf_counter() - start)


def _agreed(gen, ref):
    """Characters [B] each row writes before its first difference from the AR model's text."""
    differs = torch.cat([gen != ref, torch.ones(len(gen), 1, dtype=torch.bool)], dim=1)
    return differs.int().argmax(dim=1)


def quality(tokens, reference, tok) -> dict:
    gen, ref = tokens[:, P : P + G], reference[:, P : P + G]
    texts = [tok.decode(row) for row in gen.tolist()]
    scores = [word_quality(t, vocabulary) for t in texts]
    return {
        "gen_ppl": gen_ppl(ar.model, tokens, P, P + G),
        "same_as_ar": float(_agreed(gen, ref).float().mean()),
        "words_in_corpus": statistics.mean(s["in_corpus"] for s in scores),
        "max_repeat": max(s["max_repeat"] for s in scores),
        "sample": texts[0],
    }


rows = []
with torch.no_grad():
    for B in args.batches:
        ids = prompts(ar.tokenizer, B, P)
        ar_best, settings = 0.0, []
        for path, student in students.items():
            for tau, apart in [(tau, apart) for tau in args.taus for apart in ((True, False) if B > 1 else (True,))]:
                cfg = SampleConfig(
                    gen_length=G, steps=0, block_length=4, block_causal=True, cache="prefix",
                    threshold=tau, remasking="left_to_right", rows_apart=apart,
                )  # fmt: skip
                best = 0.0
                for _ in range(args.n):
                    ar_res, ar_tps = timed(lambda ids=ids: generate_ar(ar.model, ids, max_new_tokens=G), B)
                    res, tps = timed(lambda cfg=cfg, ids=ids, m=student.model: generate(m, ids, cfg), B)
                    ar_best, best = max(ar_best, ar_tps), max(best, tps)
                settings.append((path, tau, apart, best, res))
        rows.append({"batch": B, "model": args.ar, "threshold": None, "rows_apart": None, "tok_s": ar_best,
                     "forwards": ar_res.forward_passes, **quality(ar_res.tokens, ar_res.tokens, ar.tokenizer)})  # fmt: skip
        for path, tau, apart, tps, res in settings:
            rows.append({"batch": B, "model": path, "threshold": tau, "rows_apart": apart, "tok_s": tps,
                         "forwards": res.forward_passes, **quality(res.tokens, ar_res.tokens, ar.tokenizer)})  # fmt: skip

print(f"# OMP_NUM_THREADS=1 python docs/results/distill/sweep.py {args.n}   ({torch.__version__}, fp32)")
print("| batch | model | threshold | rows | tok/s | vs AR | forwards | tokens/forward | gen-ppl | chars as AR's | words in corpus |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    ar_tps = next(a["tok_s"] for a in rows if a["batch"] == r["batch"] and a["threshold"] is None)
    r["vs_ar"], r["tokens_per_forward"] = r["tok_s"] / ar_tps, G / r["forwards"]
    tau = "-" if r["threshold"] is None else r["threshold"]
    apart = "-" if r["rows_apart"] is None or r["batch"] == 1 else "apart" if r["rows_apart"] else "in step"
    print(f"| {r['batch']} | {Path(r['model']).name} | {tau} | {apart} | {r['tok_s']:.0f} | {r['vs_ar']:.2f}x | {r['forwards']} "
          f"| {r['tokens_per_forward']:.2f} | {r['gen_ppl']:.2f} | {r['same_as_ar']:.0f} | {r['words_in_corpus']:.1%} |")  # fmt: skip
if args.json:
    Path(args.json).write_text(json.dumps({"gen": G, "prompt": P, "runs": args.n, "rows": rows}, indent=1))
