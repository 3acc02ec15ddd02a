"""Step time of the masked-diffusion loss vs the AR loss on the same transformer and batch.

    python benchmarks/train_step.py                 # nanoGPT baby size (6x384, block 256), batch 16
    python benchmarks/train_step.py --small         # 4x128, block 128, batch 32 (a minute on a laptop)
    python benchmarks/train_step.py --device cuda   # on a GPU: also the model FLOPs utilisation (MFU)

One optimizer step = task.prepare (noise) + forward + backward + AdamW, timed after warmup, the
tasks interleaved in the same run so machine noise hits them alike: masked diffusion, AR, and block
diffusion (BD3, blocks of --block-length, its noisy and clean copies in one forward of 2L; and the
shifted-head variant with lookahead rows, one more row per block). Prints a table and the ratios
diffusion / AR (target <= 1.05) and BD3 / AR (target ~2: twice the tokens per forward), and writes
it to --out when given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from difflm.config import DiffusionConfig, TrainConfig
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.train.allocator import keep_freed_memory
from difflm.train.flops import attention_shape, flops_per_token, peak_flops
from difflm.train.objectives import AutoregressiveObjective, MaskedDiffusionObjective
from difflm.train.optim import build_optimizer
from difflm.train.trainer import autocast, step_generator


def one_step(model, task, optimizer, batch, step, precision, device: torch.device) -> float:
    start = time.perf_counter()
    prepared = task.prepare(batch, step_generator(0, step))
    with autocast(device, precision):
        loss, _ = task.loss(model, prepared)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()  # GPU work is queued: stop the clock when it is done
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per task")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default by size)")
    parser.add_argument("--block-length", type=int, default=4, help="BD3 block length K")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    layers, width, heads, block, batch_size = (4, 128, 4, 128, 32) if args.small else (6, 384, 6, 256, 16)
    vocab = 68  # Tiny Shakespeare characters + [MASK] [PAD] [EOS]
    torch.manual_seed(0)
    batch_size = args.batch_size or batch_size
    batch = {"input_ids": torch.randint(0, vocab - 3, (batch_size, block)).to(device)}
    setups = {}
    bd3 = f"bd3 K={args.block_length}"
    for name, causal in (
        ("diffusion", False),
        ("autoregressive", True),
        (bd3, False),
        (f"{bd3} lookahead", False),
    ):
        lookahead = name.endswith("lookahead")  # a shifted head with lookahead rows (from-AR runs)
        cfg = TransformerConfig(
            vocab_size=vocab,
            block_size=block,
            n_layer=layers,
            n_head=heads,
            n_embd=width,
            causal=causal,
            logits_shift=int(lookahead),
            lookahead_row=lookahead,
            mask_token_id=vocab - 3,
        )
        model = Transformer(cfg).to(device)
        if causal:
            task = AutoregressiveObjective()
        else:
            blocks = DiffusionConfig(block_length=None if name == "diffusion" else args.block_length)
            task = MaskedDiffusionObjective(blocks, mask_token_id=vocab - 3, vocab_size=vocab)
        setups[name] = (model, task, build_optimizer(model, TrainConfig()))
    times = {name: [] for name in setups}
    for step in range(args.warmup + args.steps):
        for name, (model, task, optimizer) in setups.items():
            seconds = one_step(model, task, optimizer, batch, step, args.precision, device)
            if step >= args.warmup:
                times[name].append(seconds)
    tokens = batch_size * block
    model = setups["autoregressive"][0]
    flops = flops_per_token(attention_shape(model.config), model.num_parameters(), block) * tokens
    peak = peak_flops(device)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    lines = [
        f"model {layers}x{width} ({heads} heads), block {block}, batch {batch_size}, {args.precision}, "
        f"{where}, {args.steps} timed steps",
        f"{'task':<16}{'median s/step':>14}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}",
    ]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        mfu = f"{flops / median / peak:.1%}" if peak else "-"
        lines.append(
            f"{name:<16}{median:>14.4f}{tokens / median:>12.0f}{flops / median / 1e12:>10.3f}{mfu:>8}"
        )
    ar = medians["autoregressive"]
    lines.append(
        f"ratio diffusion / autoregressive step time: {medians['diffusion'] / ar:.3f} (target <= 1.05)"
    )
    lines.append(f"ratio {bd3} / autoregressive step time: {medians[bd3] / ar:.3f} (target ~2)")
    lines.append(
        f"ratio {bd3} lookahead / autoregressive step time: {medians[bd3 + ' lookahead'] / ar:.3f} "
        f"(one more row per block)"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
