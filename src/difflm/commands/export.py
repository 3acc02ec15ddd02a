"""`difflm export CKPT OUT [--dtype bf16] [--data PATH]`: a small shareable copy of a checkpoint (e.g. for zoo/)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step folder or a run folder (its latest checkpoint)")
    parser.add_argument("out", help="the new checkpoint folder (must not exist)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight precision of the copy")
    parser.add_argument(
        "--data", default=None, help="the data source `eval` of the copy reads (default: the run's own)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from difflm.pretrained import load_pretrained
    from difflm.train.checkpoint import export_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pre = load_pretrained(args.checkpoint)
    out = export_checkpoint(
        pre.path, Path(args.out), model=pre.model, tokenizer=pre.tokenizer, dtype=dtype, data_path=args.data
    )
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({args.dtype} weights, {size:.2f} MiB, no optimizer state)")
    return 0
