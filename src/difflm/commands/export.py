"""`difflm export CKPT [CKPT ...] OUT [--dtype bf16] [--data PATH]`: a small shareable copy of a checkpoint
(e.g. for zoo/); of several, their model soup (difflm/soup.py): the average of their weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflm.errors import DifflmError

DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="checkpoint",
        help="a step folder or a run folder (its latest checkpoint); several: the average of their weights "
        "(fine-tunes of one model; config, trainer state and tokenizer from the first)",
    )
    parser.add_argument("out", help="the new checkpoint folder (must not exist)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="weight precision of the copy")
    parser.add_argument(
        "--data", default=None, help="the data source `eval` of the copy reads (default: the run's own)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from difflm.pretrained import load_pretrained
    from difflm.soup import soup
    from difflm.train.checkpoint import export_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if Path(args.out).exists():  # before loading anything
        raise DifflmError(f"{args.out} already exists; remove it or choose another folder")
    ingredients = [load_pretrained(path) for path in args.checkpoints]
    first = ingredients[0]
    model = soup(ingredients) if len(ingredients) > 1 else first.model
    out = export_checkpoint(
        first.path, Path(args.out), model=model, tokenizer=first.tokenizer, dtype=dtype, data_path=args.data
    )
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    what = f"the average of {len(ingredients)} checkpoints, " if len(ingredients) > 1 else ""
    print(f"wrote {out} ({what}{args.dtype} weights, {size:.2f} MiB, no optimizer state)")
    return 0
