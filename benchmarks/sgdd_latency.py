"""Where SGDD's batch-1 decoding time goes: the decoder's linear layers against everything else.

    python benchmarks/sgdd_latency.py --run runs/sgdd_scratch [--sentences 30] [--cfg 0,2] [--out FILE]

Decodes held-out sentences one at a time (plain decoding: the shortlist forward, then up to 16
steps) and times every `torch.nn.functional.linear` call inside it. Each call's shapes are then
replayed alone, warm, in a loop: the sum of those replays is what the linear layers cost at this
CPU's matmul speed with nothing else running (no other op, no engine, no Python around them): a
floor for this decoder in eager PyTorch. Prints per CFG scale: ms per sentence, ms inside the
linear calls, the replayed floor, and their shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples


@contextmanager
def timed_linears(calls: Counter, seconds: list[float]):
    """Count every F.linear call by (input rows, in, out, bias) and add up its time."""
    original = F.linear

    def linear(x, weight, bias=None):
        start = time.perf_counter()
        out = original(x, weight, bias)
        seconds[0] += time.perf_counter() - start
        calls[(x.numel() // x.shape[-1], weight.shape[1], weight.shape[0], bias is not None)] += 1
        return out

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original


def replayed_ms(calls: Counter, repeats: int = 20) -> float:
    """Milliseconds the counted linear calls take when each shape runs alone, warm (median)."""
    total = 0.0
    for (rows, n_in, n_out, has_bias), count in calls.items():
        x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
        b = torch.randn(n_out) if has_bias else None
        F.linear(x, w, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, w, b)
            times.append(time.perf_counter() - start)
        total += count * statistics.median(times)
    return 1000 * total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished SGDD run folder (or checkpoint)")
    p.add_argument("--sentences", type=int, default=30, help="held-out sentences decoded at batch 1")
    p.add_argument("--cfg", default="0,2", help="CFG scales, comma-separated")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    pre = load_pretrained(args.run)
    encoder = load_encoder(pre.config.model.encoder)
    pairs = split_examples(pre.config, "val")[: args.sentences]
    data = build_examples(pairs, encoder, pre.tokenizer, pre.config, 128)
    n = len(pairs)
    rows = []
    with torch.no_grad():
        decode_vectors(pre, data.vectors[:1], cfg_scale=0.0)  # warm-up
        for scale in (float(s) for s in args.cfg.split(",")):
            calls, inside = Counter(), [0.0]
            start = time.perf_counter()
            with timed_linears(calls, inside):
                for i in range(n):
                    gen = torch.Generator().manual_seed(0)
                    decode_vectors(pre, data.vectors[i : i + 1], cfg_scale=scale, generator=gen)
            wall = 1000 * (time.perf_counter() - start) / n
            rows.append(
                {
                    "cfg": scale,
                    "ms_per_sentence": wall,
                    "linear_ms": 1000 * inside[0] / n,
                    "linear_replayed_ms": replayed_ms(calls) / n,
                    "linear_calls": sum(calls.values()) / n,
                }
            )
    tokens = float(data.lengths.float().mean())
    print(f"{args.run}: {n} sentences (mean {tokens:.1f} tokens), batch 1, {torch.get_num_threads()} threads, fp32")
    print("| CFG | ms / sentence | in linear calls | linears replayed alone | linear share | floor share | calls |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['cfg']:g} | {r['ms_per_sentence']:.1f} | {r['linear_ms']:.1f} | {r['linear_replayed_ms']:.1f} "
            f"| {r['linear_ms'] / r['ms_per_sentence']:.0%} | {r['linear_replayed_ms'] / r['ms_per_sentence']:.0%} "
            f"| {r['linear_calls']:.0f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"run": args.run, "sentences": n, "mean_tokens": tokens, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
