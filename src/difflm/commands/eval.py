"""`difflm eval CKPT`: the metrics of a checkpoint on its validation split, chosen by its task;
with `--tasks`, lm-evaluation-harness tasks (e.g. gsm8k) through the `difflm` lm-eval model."""

from __future__ import annotations

import argparse
import json
import math
import time

from difflm.commands.flags import add_flags, options_from
from difflm.errors import DifflmError
from difflm.evaluate.options import EvalOptions, HarnessOptions
from difflm.evaluate.poem_completion import PoemOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a step folder or a run folder (its latest checkpoint), or 'poem-completion'"
    )
    add_flags(parser.add_argument_group("poem-completion (difflm eval poem-completion ...)"), PoemOptions)
    add_flags(parser, EvalOptions)
    harness = parser.add_argument_group(
        "lm-evaluation-harness (needs difflm[lmeval]; --batch-size is rows per forward, and "
        "--device, --precision, --json, --no-verify apply)"
    )
    add_flags(harness, HarnessOptions)


def check_args(opts: EvalOptions) -> None:
    """Counts checked before anything is loaded (`--max-batches 0` would otherwise mean 'all')."""
    for flag in ("samples", "batch_size", "max_batches", "continuations", "gen_length", "best_of", "search_patience"):
        value = getattr(opts, flag)
        if value is not None and value < 1:
            raise DifflmError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if opts.cfg_scale is not None and not (math.isfinite(opts.cfg_scale) and opts.cfg_scale >= 0):
        raise DifflmError(f"--cfg-scale must be a finite number >= 0 (0 = no guidance), got {opts.cfg_scale}")
    for flag in ("rounds", "search"):
        if getattr(opts, flag) < 0:
            raise DifflmError(f"--{flag} must be >= 0, got {getattr(opts, flag)}")
    if opts.int8 and opts.precision != "fp32":
        raise DifflmError(f"--int8 decodes with float32 activations; drop --precision {opts.precision}")
    if not (math.isfinite(opts.fluency) and opts.fluency >= 0):
        raise DifflmError(f"--fluency must be a finite number >= 0 (0 = cosine only), got {opts.fluency}")


def run_tasks(opts: EvalOptions, harness: HarnessOptions, checkpoint: str) -> int:
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

    check_args(opts)
    resolve_device(opts.device, "--device")
    pre = load_pretrained(checkpoint, opts.device, verify=not opts.no_verify)
    lm = DifflmLM(pre, batch_size=opts.batch_size, **simple_parse_args_string(harness.model_args))
    with autocast(torch.device(opts.device), opts.precision):
        results = simple_evaluate(
            model=lm,
            tasks=harness.tasks.split(","),
            task_manager=TaskManager(include_path=harness.include_path),
            limit=harness.limit,
            num_fewshot=harness.num_fewshot,
            apply_chat_template=harness.apply_chat_template,
            log_samples=False,
        )
    print(json.dumps(results["results"], default=str) if opts.json else make_table(results))
    return 0


def run(parsed: argparse.Namespace) -> int:
    opts, checkpoint = options_from(EvalOptions, parsed), parsed.checkpoint
    if checkpoint == "poem-completion":
        from difflm.evaluate.poem_completion import main

        return main(options_from(PoemOptions, parsed), opts)
    harness = options_from(HarnessOptions, parsed)
    if harness.tasks:
        return run_tasks(opts, harness, checkpoint)
    return run_metrics(opts, checkpoint)


def run_metrics(opts: EvalOptions, checkpoint: str) -> int:
    """The metrics of `checkpoint` from its system's evaluator, printed."""
    import torch

    from difflm.pretrained import load_pretrained
    from difflm.systems.registry import get_system, resolve
    from difflm.train.trainer import autocast, resolve_device

    check_args(opts)
    resolve_device(opts.device, "--device")
    pre = load_pretrained(checkpoint, opts.device, verify=not opts.no_verify)
    sgdd_only = opts.data or opts.best_of > 1 or opts.rounds or opts.search or opts.fluency or opts.cfg_scale is not None
    if (sgdd_only or opts.int8) and pre.config.task != "sgdd":
        raise DifflmError(
            "--data, --cfg-scale, --best-of, --rounds, --search, --fluency and --int8 are for SGDD checkpoints"
        )
    if opts.int8:
        pre.model.int8_()
    if opts.split != "val" and pre.config.task != "sgdd":
        raise DifflmError(
            f"--split {opts.split} is for SGDD checkpoints; task '{pre.config.task}' scores val only"
        )
    system = get_system(pre.config.task)
    if system.evaluate is None:
        raise DifflmError(f"task '{system.name}' has no evaluator (see difflm systems)")
    start = time.perf_counter()
    with autocast(torch.device(opts.device), opts.precision):
        metrics = {
            "checkpoint": str(pre.path),
            "task": pre.config.task,
            **resolve(system.evaluate)(pre, opts),
        }
    metrics["precision"] = opts.precision + (", int8 decoder weights" if opts.int8 else "")
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if opts.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0
