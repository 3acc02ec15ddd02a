"""What the unmasking engine itself costs per step, with the model replaced by a table lookup.

    python benchmarks/engine_overhead.py [--checkpoint zoo/shakespeare_char_bd3_4_1k] [--batches 1 16]

At batch 1 a small model's forward takes a few milliseconds, so the engine's own work between
forwards (choosing the rows and positions, drawing, counting and revealing tokens, the cache's
bookkeeping) is a visible share of a step. Here the checkpoint's forward returns rows of a fixed
random table instead of running the network, so what is timed is the engine alone: block
diffusion decoding as `difflm sample` runs it for a BD3 checkpoint (block-causal cache, left to
right, threshold 0.3, gen 256), the best of --repeats runs, one thread. Prints ms per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from sampling import prompts

from difflm.pretrained import load_pretrained
from difflm.sampling.unmask import SampleConfig, generate


def table_model(model: torch.nn.Module, vocab: int) -> None:
    """Swap the forward for a lookup: rows of a fixed table at the positions asked for."""
    table = torch.randn(8192, vocab, generator=torch.Generator().manual_seed(0)) * 3

    def forward(x, logits_at=None, position_offset: int = 0, **_) -> torch.Tensor:
        n = int(logits_at.sum())
        return table[position_offset : position_offset + n]

    model.forward = forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="zoo/shakespeare_char_bd3_4_1k", help="a BD3 checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    pre = load_pretrained(args.checkpoint)
    K = pre.config.diffusion.block_length
    cfg = SampleConfig(
        gen_length=args.gen_length,
        steps=0,
        block_length=K,
        block_causal=True,
        cache="prefix",
        threshold=args.threshold,
        remasking="left_to_right",
    )
    table_model(pre.model, pre.model.config.vocab_size)
    print(f"{args.checkpoint}: blocks of {K}, gen {args.gen_length}, threshold {args.threshold}, 1 thread")
    print("| batch | steps | engine ms / step |")
    print("| --- | --- | --- |")
    with torch.no_grad():
        for B in args.batches:
            ids = prompts(pre.tokenizer, B, 32)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = generate(pre.model, ids, cfg)
                best = min(best, (time.perf_counter() - start) / out.forward_passes)
            print(f"| {B} | {out.forward_passes} | {1000 * best:.3f} |")


if __name__ == "__main__":
    main()
