"""Where one AR training step's time goes, ATen call by call: the core transformer against nanoGPT's.

    python docs/results/train_step/op_account.py --nanogpt-dir DIR [--rounds 6] [--rows 30]

DIR holds a copy of nanoGPT's `model.py` (github.com/karpathy/nanoGPT; not part of difflm). 4x128,
block 128, batch 32, fp32, one thread, freed memory kept (as difflm's trainer does on a CPU). Each
round runs one step (forward, backward, optimizer) of each model in turn, the order reversed every
other round, under a dispatch mode that times every ATen call; the table gives each call's mean ms
a step and calls a step, keyed by operator and the shapes of its tensor arguments, largest first,
and each model's matmuls in all. The timer adds its own cost to every call (nanoGPT's step makes
more calls), so compare rows, not sums of all rows, and take step times from nanogpt_compare.py. To account for an earlier version of difflm, run
it with that version's `src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from nanogpt_compare import VOCAB, nanogpt
from torch.utils._python_dispatch import TorchDispatchMode

from difflm.config import TrainConfig
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.train.allocator import keep_freed_memory
from difflm.train.optim import build_optimizer

LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 128, 32


class CallTimer(TorchDispatchMode):
    """Seconds and count of every ATen call, keyed by operator and argument shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        key = f"{func.__name__} {shapes}" if shapes else func.__name__
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt-dir", required=True, help="folder with nanoGPT's model.py")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=30, help="table rows, largest first")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, BLOCK + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    shape = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH)
    models = {
        "difflm": Transformer(TransformerConfig(**shape, causal=True, tie_embeddings=True)),
        "nanoGPT": nanogpt(args.nanogpt_dir, LAYERS, HEADS, WIDTH, BLOCK),
    }
    optimizers = {"difflm": build_optimizer(models["difflm"], TrainConfig(lr=1e-4))}
    optimizers["nanoGPT"] = torch.optim.AdamW(models["nanoGPT"].parameters(), lr=1e-4)

    def step(name: str) -> None:
        if name == "nanoGPT":
            _, loss = models[name](inputs, targets)
        else:
            loss = F.cross_entropy(models[name](inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    names = list(models)
    for name in names:  # warm up
        step(name), step(name)
    timers = {name: CallTimer() for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with timers[name]:
                step(name)
    keys = set(timers["difflm"].seconds) | set(timers["nanoGPT"].seconds)
    largest = sorted(keys, key=lambda k: -max(t.seconds.get(k, 0.0) for t in timers.values()))
    print(f"4x128, block 128, batch 32, fp32, 1 thread, {args.rounds} rounds, every ATen call timed")
    print("| call [argument shapes] | difflm ms / step | calls | nanoGPT ms / step | calls |")
    print("| --- | --- | --- | --- | --- |")
    for key in largest[: args.rows]:
        cells = [
            f"{1e3 * t.seconds.get(key, 0.0) / args.rounds:.2f} | {t.calls.get(key, 0) // args.rounds}"
            for t in timers.values()
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    matmuls = [
        f"{1e3 * sum(s for k, s in t.seconds.items() if k.startswith(('mm.', 'addmm.'))) / args.rounds:.1f}"
        for t in timers.values()
    ]
    print(f"| all matmuls (mm, addmm) | {matmuls[0]} | | {matmuls[1]} | |")


if __name__ == "__main__":
    main()
