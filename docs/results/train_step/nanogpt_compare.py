"""One AR training step of the core transformer against nanoGPT's, same shapes and batch.

    python docs/results/train_step/nanogpt_compare.py --nanogpt-dir DIR         # 4x128, block 128, batch 32
    python docs/results/train_step/nanogpt_compare.py --nanogpt-dir DIR --baby  # 6x384, block 256

DIR holds a copy of nanoGPT's `model.py` (github.com/karpathy/nanoGPT; not part of difflm). Each
round runs one step (forward, backward, AdamW) of every model in turn, bf16 autocast (`--precision
fp32`: none, for CPUs without AVX512-BF16, where bf16 matmuls are emulated), one thread, the order
reversed every other round; the figure is the median over rounds of each model's step time divided
by nanoGPT's in the same round. Each model steps with its own trainer's optimizer on the CPU:
difflm's fused AdamW, nanoGPT's torch AdamW (its trainer fuses on CUDA only). Configurations: the
defaults (RoPE, RMSNorm, erf-GELU), the tanh-GELU of checkpoints made before stop 36, and
nanoGPT's architecture. As difflm's trainer does on a CPU, the process keeps freed memory
(`difflm.train.allocator`; `--glibc-malloc` leaves glibc's settings); the table also gives each
model's median page faults per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflm.config import TrainConfig
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.train.allocator import keep_freed_memory
from difflm.train.optim import build_optimizer

CONFIGS = {
    "defaults": {},
    "defaults, tanh-GELU": {"mlp": "gelu"},
    "nanoGPT's": {"norm": "layer", "rope": False, "learned_positions": True, "mlp": "gelu_exact"},
}
VOCAB = 68  # Tiny Shakespeare characters + [MASK] [PAD] [EOS]


def nanogpt(directory: str, layers: int, heads: int, width: int, block: int) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(directory) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(block_size=block, vocab_size=VOCAB, n_layer=layers, n_head=heads, n_embd=width, dropout=0.0)
    return module.GPT(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt-dir", required=True, help="folder with nanoGPT's model.py")
    parser.add_argument("--baby", action="store_true", help="6x384, block 256, batch 16")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--glibc-malloc", action="store_true", help="leave malloc as glibc sets it")
    args = parser.parse_args()
    # difflm's trainer keeps freed memory on CPUs (train/allocator.py); process-wide, so nanoGPT too
    kept = not args.glibc_malloc and keep_freed_memory()
    allocator = "freed memory kept" if kept else "glibc's defaults"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers, heads, width, block, batch = (6, 6, 384, 256, 16) if args.baby else (4, 4, 128, 128, 32)
    ids = torch.randint(0, VOCAB, (batch, block + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    shape = dict(vocab_size=VOCAB, block_size=block, n_layer=layers, n_head=heads, n_embd=width)
    models = {
        name: Transformer(TransformerConfig(**shape, causal=True, tie_embeddings=True, **overrides))
        for name, overrides in CONFIGS.items()
    }
    models["nanoGPT"] = nanogpt(args.nanogpt_dir, layers, heads, width, block)
    # each model's own trainer's optimizer on the CPU: difflm's fused AdamW, nanoGPT's torch AdamW
    # (its configure_optimizers fuses on CUDA only)
    optimizers = {name: build_optimizer(model, TrainConfig(lr=1e-4)) for name, model in models.items()}
    optimizers["nanoGPT"] = torch.optim.AdamW(models["nanoGPT"].parameters(), lr=1e-4)

    def step(name: str) -> tuple[float, int]:
        start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if name == "nanoGPT":
                _, loss = models[name](inputs, targets)
            else:
                loss = F.cross_entropy(models[name](inputs).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    names = list(models)
    for name in names:  # warm up
        step(name), step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds, page_faults = step(name)
            times[name].append(seconds)
            faults[name].append(page_faults)
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    print(f"{layers}x{width}, block {block}, batch {batch}, {precision}, 1 thread, {args.rounds} rounds, {allocator}")
    print("| configuration | median step ms | step / nanoGPT's (median of rounds) | quartiles | page faults / step |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        ratios = sorted(a / b for a, b in zip(times[name], times["nanoGPT"], strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]
        median_ms, median_faults = 1e3 * statistics.median(times[name]), statistics.median(faults[name])
        print(f"| {name} | {median_ms:.0f} | {statistics.median(ratios):.3f} | {q1:.3f}-{q3:.3f} | {median_faults:.0f} |")


if __name__ == "__main__":
    main()
