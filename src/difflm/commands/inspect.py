"""`difflm inspect A B`: compare the tensor names and shapes of two checkpoints (headers only)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="first checkpoint folder or .safetensors file (column A)")
    parser.add_argument("dst", help="second checkpoint folder or .safetensors file (column B)")
    parser.add_argument("--diff-only", action="store_true", help="list only keys whose shapes differ")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from difflm.convert import inspect_checkpoints, render_inspect_table

    rows = inspect_checkpoints(args.src, args.dst)
    Console().print(render_inspect_table(rows, only_differences=args.diff_only))
    return 0
