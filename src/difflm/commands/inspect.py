"""`difflm inspect A B`: compare the tensor names and shapes of two checkpoints (headers only);
`difflm inspect DIR` on a published snapshot (LLaDA, Dream): which parameter of difflm's model each
stored key loads into, with shape, dtype and the missing or unexpected keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflm.errors import DifflmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="first checkpoint folder or .safetensors file (column A), or a snapshot folder"
    )
    parser.add_argument(
        "dst", nargs="?", default=None, help="second checkpoint folder or .safetensors file (column B)"
    )
    parser.add_argument("--diff-only", action="store_true", help="list only keys whose shapes differ")


def run(args: argparse.Namespace) -> int:
    if args.dst is None:
        return map_snapshot(Path(args.src))
    from rich.console import Console

    from difflm.convert import inspect_checkpoints, render_inspect_table

    rows = inspect_checkpoints(args.src, args.dst)
    Console().print(render_inspect_table(rows, only_differences=args.diff_only))
    return 0


def map_snapshot(path: Path) -> int:
    from difflm import snapshots

    if not snapshots.is_snapshot(path):
        raise DifflmError(
            f"{path} is not a snapshot folder (config.json, no difflm.json); give two checkpoints to compare"
        )
    class_name, rows = snapshots.map_keys(path)
    print(snapshots.render_key_map(path, class_name, rows))
    return 0
