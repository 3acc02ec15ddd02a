"""`difflm eval CKPT`: the metrics of a checkpoint on its validation split, chosen by its task."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch

from difflm.errors import DifflmError
from difflm.evaluate import poem_completion
from difflm.evaluate.forcing import eval_forcing
from difflm.evaluate.likelihood import ar_nll, elbo_nll
from difflm.evaluate.sgdd import eval_sgdd
from difflm.pretrained import Pretrained, load_pretrained
from difflm.systems.prefix_diffusion import eval_prefix_system
from difflm.train.systems import text_blocks
from difflm.train.trainer import autocast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a step folder or a run folder (its latest checkpoint), or 'poem-completion'"
    )
    poem_completion.add_arguments(parser)
    parser.add_argument("--samples", type=int, default=4, help="Monte-Carlo draws of t per sequence (ELBO)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N val batches")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="ELBO of block diffusion with blocks of K tokens (default: the checkpoint's diffusion.block_length)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--split",
        default="val",
        choices=("val", "train"),
        help="sgdd: score the held-out examples, or as many training ones (a memorisation check)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast for the model's forwards (bf16: ~2.5x faster on CPUs with AVX-512 BF16)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument(
        "--judge", default=None, help="teacher_forcing checkpoint scoring generations (gen_ppl)"
    )
    parser.add_argument("--continuations", type=int, default=8, help="held-out prompts continued (forcing)")
    parser.add_argument(
        "--gen-length", type=int, default=256, help="tokens generated per continuation (forcing)"
    )


def eval_masked_diffusion(pre: Pretrained, args: argparse.Namespace) -> dict:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    block_length = args.block_length or pre.config.diffusion.block_length
    nll = elbo_nll(
        pre.model,
        val,
        schedule=pre.config.diffusion.schedule,
        mask_token_id=pre.tokenizer.mask_token_id,
        vocab_size=pre.tokenizer.vocab_size,
        batch_size=args.batch_size,
        samples=args.samples,
        seed=args.seed,
        max_batches=args.max_batches,
        block_length=block_length,
    )
    return {
        "val_elbo_nll": nll,
        "val_ppl_bound": math.exp(nll),
        "samples": args.samples,
        "block_length": block_length,
    }


def eval_autoregressive(pre: Pretrained, args: argparse.Namespace) -> dict:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    nll = ar_nll(pre.model, val, batch_size=args.batch_size, max_batches=args.max_batches)
    return {"val_loss": nll, "val_ppl": math.exp(nll)}


EVALUATORS: dict[str, Callable[[Pretrained, argparse.Namespace], dict]] = {
    "masked_diffusion": eval_masked_diffusion,
    "qwen3_llada_pretrain": eval_masked_diffusion,  # full attention (no block bias)
    "autoregressive": eval_autoregressive,
    "sgdd": eval_sgdd,
    "prefix_diffusion": eval_prefix_system,
    "poems_ar": eval_prefix_system,
    "teacher_forcing": eval_forcing,
    "diffusion_forcing": eval_forcing,
}


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "poem-completion":
        return poem_completion.main(args)
    if args.samples < 1:
        raise DifflmError(f"--samples must be >= 1, got {args.samples}")
    pre = load_pretrained(args.checkpoint, args.device)
    if args.split != "val" and pre.config.task != "sgdd":
        raise DifflmError(
            f"--split {args.split} is for SGDD checkpoints; task '{pre.config.task}' scores val only"
        )
    if pre.config.task not in EVALUATORS:
        raise DifflmError(f"no evaluator for task '{pre.config.task}'; known: {', '.join(EVALUATORS)}")
    start = time.perf_counter()
    with autocast(torch.device(args.device), args.precision):
        metrics = {
            "checkpoint": str(pre.path),
            "task": pre.config.task,
            **EVALUATORS[pre.config.task](pre, args),
        }
    metrics["precision"] = args.precision
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
