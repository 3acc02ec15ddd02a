"""Step time of the masked-diffusion loss vs the AR loss on the same transformer and batch.

    python benchmarks/train_step.py                 # nanoGPT baby size (6x384, block 256), batch 16
    python benchmarks/train_step.py --small         # 4x128, block 128, batch 32 (a minute on a laptop)

One optimizer step = task.prepare (noise) + forward + backward + AdamW, timed after warmup, both
tasks interleaved in the same run so machine noise hits both alike. Prints a table and the ratio
diffusion / AR (target <= 1.05) and writes it to --out when given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from difflm.config import DiffusionConfig, TrainConfig
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.train.optim import build_optimizer
from difflm.train.tasks import AutoregressiveTask, MaskedDiffusionTask
from difflm.train.trainer import autocast, step_generator


def one_step(model, task, optimizer, batch, step, precision) -> float:
    start = time.perf_counter()
    prepared = task.prepare(batch, step_generator(0, step))
    with autocast(torch.device("cpu"), precision):
        loss, _ = task.loss(model, prepared)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per task")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    layers, width, heads, block, batch_size = (4, 128, 4, 128, 32) if args.small else (6, 384, 6, 256, 16)
    vocab = 68  # Tiny Shakespeare characters + [MASK] [PAD] [EOS]
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab - 3, (batch_size, block))}
    setups = {}
    for name, causal in (("diffusion", False), ("autoregressive", True)):
        cfg = TransformerConfig(
            vocab_size=vocab,
            block_size=block,
            n_layer=layers,
            n_head=heads,
            n_embd=width,
            causal=causal,
            mask_token_id=vocab - 3,
        )
        model = Transformer(cfg)
        task = (
            MaskedDiffusionTask(DiffusionConfig(), mask_token_id=vocab - 3, vocab_size=vocab)
            if name == "diffusion"
            else AutoregressiveTask()
        )
        setups[name] = (model, task, build_optimizer(model, TrainConfig()))
    times = {name: [] for name in setups}
    for step in range(args.warmup + args.steps):
        for name, (model, task, optimizer) in setups.items():
            seconds = one_step(model, task, optimizer, batch, step, args.precision)
            if step >= args.warmup:
                times[name].append(seconds)
    tokens = batch_size * block
    lines = [
        f"model {layers}x{width} ({heads} heads), block {block}, batch {batch_size}, {args.precision}, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps",
        f"{'task':<16}{'median s/step':>14}{'tokens/s':>12}",
    ]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        lines.append(f"{name:<16}{median:>14.4f}{tokens / median:>12.0f}")
    lines.append(
        f"ratio diffusion / autoregressive step time: {medians['diffusion'] / medians['autoregressive']:.3f}"
        " (target <= 1.05)"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
