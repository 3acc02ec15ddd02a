"""Tokens per forward against gen-ppl for the delayed cache with threshold decoding, no clock:
the quality side of the Fast-dLLM targets, over more prompts than the timed benchmark decodes.

Gen 256 after 32-character prompts from the held-out tail (the prompts benchmarks/sampling.py
gives a batch of that size), blocks of 32, greedy. Vanilla (one character a forward) decodes all
rows at once as the reference; every threshold row decodes each prompt alone, as at batch 1, so
its forwards per prompt are what a batch-1 run pays. gen-ppl is judged by the AR model. Run from
the repository root:

    OMP_NUM_THREADS=1 python docs/results/distill/frontier.py CKPT [CKPT ...] --prompts 16 --json OUT
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from sampling import gen_ppl, prompts  # noqa: E402

from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("checkpoints", nargs="+")
p.add_argument("--ar", default="zoo/shakespeare_char_ar_1k", help="the judge")
p.add_argument("--prompts", type=int, default=16)
p.add_argument("--taus", type=float, nargs="+", default=[0.89, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95])
p.add_argument("--json", help="also write every figure here")
args = p.parse_args()
G, P = 256, 32
torch.set_num_threads(1)
judge = load_pretrained(args.ar).model
figures = {}
with torch.no_grad():
    for path in args.checkpoints:
        model = load_pretrained(path)
        ids = prompts(model.tokenizer, args.prompts, P)
        base = {"gen_length": G, "steps": G, "block_length": 32}
        ref = gen_ppl(judge, generate(model.model, ids, SampleConfig(**base)).tokens, P, P + G)
        rows = {"vanilla": {"tokens_per_forward": 1.0, "gen_ppl": ref}}
        print(f"{path}: vanilla gen-ppl {ref:.3f}", flush=True)
        for tau in args.taus:
            cfg = SampleConfig(**base, cache="delayed", threshold=tau)
            runs = [generate(model.model, ids[r : r + 1], cfg) for r in range(len(ids))]
            per_forward = len(ids) * G / sum(run.forward_passes for run in runs)
            ppl = gen_ppl(judge, torch.cat([run.tokens for run in runs]), P, P + G)
            rows[f"delayed cache + threshold {tau}"] = {"tokens_per_forward": per_forward, "gen_ppl": ppl}
            change = f"{ppl / ref - 1:+.1%}"
            print(f"  threshold {tau}: {per_forward:.2f} tokens a forward, gen-ppl {ppl:.3f} ({change})", flush=True)
        figures[path] = rows
if args.json:
    record = {"prompts": args.prompts, "gen_length": G, "figures": figures}
    Path(args.json).write_text(json.dumps(record, indent=1))
