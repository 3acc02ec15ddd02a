"""Sampling speed of Qwen3-LLaDA: vanilla vs KV caches, and block-only vs full vocabulary projection.

    python benchmarks/qwen3_llada_sampling.py            # 4 layers x 256, Qwen3's 151,936-token vocabulary
    python benchmarks/qwen3_llada_sampling.py --quick    # 2 layers x 128, vocabulary 32,000

Speed only: the weights are random (no hub download here), and with a fixed number of steps the
work of a step does not depend on the weights, so tokens/s and forward counts are what a trained
model of this shape would show. "full logits" hides `logits_at` from the engine (the model then
projects every position onto the vocabulary, as before the engine asked for the block only).
Prints a table and writes it to --out.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from difflm.models.qwen3_llada import Qwen3LLaDASpec, build_qwen3_llada
from difflm.sampling.unmask import SampleConfig, generate


class FullLogits(nn.Module):
    """The same denoiser behind a forward without `logits_at`: every position gets logits."""

    supports_kv_cache, supports_logits_at, logits_shift = True, False, 0

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.mask_token_id = model, model.config, model.mask_token_id
        self.max_length = model.max_length

    def forward(self, input_ids, attention_bias=None, position_offset=0, kv_cache=None, attend_len=None):
        return self.inner(
            input_ids,
            attention_bias=attention_bias,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
        )

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None):
        return self.inner.kv_cache(batch, max_len, dtype)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench/qwen3_llada_sampling.md")
    return p.parse_args()


def build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    vocab, width, layers = (32_000, 128, 2) if args.quick else (151_936, 256, 4)
    spec = Qwen3LLaDASpec(
        vocab_size=vocab,
        mask_token_id=vocab - 1,
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        max_position_embeddings=args.prompt_length + args.gen_length,
    )
    return build_qwen3_llada(spec).eval()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    G, P = args.gen_length, args.prompt_length
    rows = []
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    with torch.no_grad(), precision:
        for B in args.batches:
            ids = torch.randint(
                0, model.config.vocab_size - 1, (B, P), generator=torch.Generator().manual_seed(B)
            )
            base = None
            for logits in ("full", "block"):
                denoiser = FullLogits(model) if logits == "full" else model
                for cache in ("none", "prefix", "dual"):
                    cfg = SampleConfig(gen_length=G, steps=G, block_length=args.block_length, cache=cache)
                    start = time.perf_counter()
                    res = generate(denoiser, ids, cfg)
                    tps = B * G / (time.perf_counter() - start)
                    base = base or tps
                    rows.append(
                        [
                            G,
                            B,
                            f"{logits} logits",
                            cache,
                            f"{tps:.1f}",
                            f"{tps / base:.1f}x",
                            res.forward_passes,
                        ]
                    )
                    print(rows[-1], flush=True)
    header = ["gen", "batch", "vocab projection", "cache", "tok/s", "speedup", "forwards"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    text = "\n".join(
        [
            f"Qwen3-LLaDA sampling speed: CPU ({args.threads} threads), {args.precision}; {n_params / 1e6:.1f}M params "
            f"(vocabulary {model.config.vocab_size}), prompt {P}, block {args.block_length}, one token per step; "
            "speedup over full-logits vanilla at the same batch.",
            "",
            line(header),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *map(line, rows),
        ]
    )
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
