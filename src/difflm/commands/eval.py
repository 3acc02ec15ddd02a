"""`difflm eval CKPT`: the metrics of a checkpoint on its validation split, chosen by its task;
with `--tasks`, lm-evaluation-harness tasks (e.g. gsm8k) through the `difflm` lm-eval model."""

from __future__ import annotations

import argparse
import json
import time

from difflm.errors import DifflmError
from difflm.evaluate import poem_completion


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
        "--data",
        default=None,
        help="sgdd: score this file instead (one sentence a line, or JSONL / TSV pairs)",
    )
    parser.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="sgdd: decode N candidates, keep the one the encoder finds closest",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="sgdd: correction rounds (re-mask the least likely tokens, keep if closer)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast for the model's forwards (bf16: ~2.5x faster on CPUs with AVX-512 BF16)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the checkpoint's files (sizes only)",
    )
    parser.add_argument(
        "--judge", default=None, help="teacher_forcing checkpoint scoring generations (gen_ppl)"
    )
    parser.add_argument("--continuations", type=int, default=8, help="held-out prompts continued (forcing)")
    parser.add_argument(
        "--gen-length", type=int, default=256, help="tokens generated per continuation (forcing)"
    )
    harness = parser.add_argument_group(
        "lm-evaluation-harness (needs difflm[lmeval]; --batch-size is rows per forward, and "
        "--device, --precision, --json, --no-verify apply)"
    )
    harness.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval tasks (e.g. gsm8k) instead of the val metrics"
    )
    harness.add_argument(
        "--model-args",
        default="",
        help="the model's settings, as lm_eval's --model_args: e.g. gen_length=256,steps=256,block_length=32,"
        "cache=dual,threshold=0.9,mc_num=128,seed=1234 (difflm.evaluate.lm_eval.HarnessSettings)",
    )
    harness.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    harness.add_argument(
        "--limit",
        type=float,
        default=None,
        help="only the first N documents of each task (a fraction if < 1)",
    )
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    harness.add_argument(
        "--apply-chat-template", action="store_true", help="format prompts with the tokenizer's chat template"
    )


def check_args(args: argparse.Namespace) -> None:
    """Counts checked before anything is loaded (`--max-batches 0` would otherwise mean 'all')."""
    for flag in ("samples", "batch_size", "max_batches", "continuations", "gen_length", "best_of"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DifflmError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.rounds < 0:
        raise DifflmError(f"--rounds must be >= 0, got {args.rounds}")


def run_tasks(args: argparse.Namespace) -> int:
    """`--tasks`: lm-eval's simple_evaluate with a `DifflmLM` over the checkpoint."""
    import torch

    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table, simple_parse_args_string

        from difflm.evaluate.lm_eval import DifflmLM
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        raise DifflmError("--tasks needs lm-evaluation-harness: pip install 'difflm[lmeval]'") from None
    from difflm.pretrained import load_pretrained
    from difflm.train.trainer import autocast, resolve_device

    check_args(args)
    resolve_device(args.device, "--device")
    pre = load_pretrained(args.checkpoint, args.device, verify=not args.no_verify)
    lm = DifflmLM(pre, batch_size=args.batch_size, **simple_parse_args_string(args.model_args))
    with autocast(torch.device(args.device), args.precision):
        results = simple_evaluate(
            model=lm,
            tasks=args.tasks.split(","),
            task_manager=TaskManager(include_path=args.include_path),
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            apply_chat_template=args.apply_chat_template,
            log_samples=False,
        )
    print(json.dumps(results["results"], default=str) if args.json else make_table(results))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "poem-completion":
        return poem_completion.main(args)
    if args.tasks:
        return run_tasks(args)
    import torch

    from difflm.pretrained import load_pretrained
    from difflm.systems.registry import get_system, resolve
    from difflm.train.trainer import autocast, resolve_device

    check_args(args)
    resolve_device(args.device, "--device")
    pre = load_pretrained(args.checkpoint, args.device, verify=not args.no_verify)
    if (args.data or args.best_of > 1 or args.rounds) and pre.config.task != "sgdd":
        raise DifflmError("--data, --best-of and --rounds are for SGDD checkpoints")
    if args.split != "val" and pre.config.task != "sgdd":
        raise DifflmError(
            f"--split {args.split} is for SGDD checkpoints; task '{pre.config.task}' scores val only"
        )
    system = get_system(pre.config.task)
    if system.evaluate is None:
        raise DifflmError(f"task '{system.name}' has no evaluator (see difflm systems)")
    start = time.perf_counter()
    with autocast(torch.device(args.device), args.precision):
        metrics = {
            "checkpoint": str(pre.path),
            "task": pre.config.task,
            **resolve(system.evaluate)(pre, args),
        }
    metrics["precision"] = args.precision
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
