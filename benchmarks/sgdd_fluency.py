"""Choose the SGDD fluency stage's weight and pool on training sentences, never on the held-out ones.

    python benchmarks/sgdd_fluency.py --run runs/sgdd_minilm_g [--examples 200] [--out FILE]

Runs the edit search once (best of --best-of, --search rounds, --patience) on a seeded sample of
the run's training split (texts of at most --max-tokens WordPiece tokens, like the held-out ones),
scores the decoder's pseudo-log-likelihood of each sentence's --pools' largest number of closest
texts once, then answers with every (pool, weight) of the grid from that one search and prints EM,
BLEU, chrF and cosine for each. The held-out evaluation (benchmarks/sgdd.py) then uses the chosen
setting. Writes a JSON of every figure, the command, the wall time and the hardware to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from difflm.evaluate.sgdd import score
from difflm.evaluate.sgdd_verify import Verification, fluency_pool, from_texts, verified_search
from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples

WEIGHTS = "0,0.001,0.002,0.003,0.005,0.01,0.02,0.05"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished SGDD phase-1 run (or checkpoint)")
    p.add_argument("--examples", type=int, default=200, help="training sentences sampled")
    p.add_argument("--sample-seed", type=int, default=1, help="seed of the sample of the training split")
    p.add_argument("--max-tokens", type=int, default=30, help="longest sentence sampled, in WordPiece tokens")
    p.add_argument("--best-of", type=int, default=4)
    p.add_argument("--search", type=int, default=12)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--pools", default="8,16,32", help="closest texts chosen among, comma-separated")
    p.add_argument("--weights", default=WEIGHTS, help="fluency weights, comma-separated")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", default=None, help="JSON file of every figure")
    return p.parse_args()


def training_sample(pre, args: argparse.Namespace) -> list[tuple[str, str]]:
    """--examples pairs of the training split, shuffled with --sample-seed, none over --max-tokens."""
    pairs = split_examples(pre.config, "train")
    random.Random(args.sample_seed).shuffle(pairs)
    tok = pre.tokenizer.tok
    short = (p for p in pairs if len(tok(p[0], add_special_tokens=False)["input_ids"]) <= args.max_tokens)
    return [p for _, p in zip(range(args.examples), short, strict=False)]


def main() -> None:
    args = parse_args()
    pre = load_pretrained(args.run)
    encoder = load_encoder(pre.config.model.encoder)
    data = build_examples(training_sample(pre, args), encoder, pre.tokenizer, pre.config, 128)
    pools = sorted({int(x) for x in args.pools.split(",")})
    weights = [float(x) for x in args.weights.split(",")]
    verify = Verification(candidates=args.best_of, search=args.search, patience=args.patience)
    start, pad = time.perf_counter(), pre.tokenizer.pad_token_id
    outputs: dict[tuple[int, float], list[list[int]]] = {(k, w): [] for k in pools for w in weights}
    with torch.no_grad():
        for i in range(0, len(data.vectors), args.batch_size):
            chunk = data.vectors[i : i + args.batch_size]
            state = verified_search(pre, encoder, chunk, verify, cfg_scale=0.0, generator=torch.Generator().manual_seed(0))
            pool = fluency_pool(pre, chunk, state, pools[-1])
            for k, w in outputs:
                outputs[k, w] += from_texts(pool.choose(w, k), pad).as_lists()
            print(f"{i + len(chunk)} sentences, {time.perf_counter() - start:.0f} s", flush=True)
        rows = [{"pool": k, "F": w, **score(pre, encoder, data.vectors, data, outs)} for (k, w), outs in outputs.items()]
    print("| pool | F | EM % | BLEU | chrF | cosine |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['pool']} | {r['F']:g} | {100 * r['exact_match']:.1f} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['cosine']:.3f} |")
    if args.out:
        meta = {
            "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "wall_minutes": (time.perf_counter() - start) / 60,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, fp32",
            "examples": len(data.vectors),
            "search": {"N": args.best_of, "S": args.search, "P": args.patience, "cfg": 0.0},
        }
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
