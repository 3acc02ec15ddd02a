"""`difflm` command line: a dict of sub-commands, each a module with `add_arguments` and `run`.

The CLI is thin on purpose: every sub-command parses its arguments and calls one library
function. A `DifflmError` (bad input the user can fix) is printed on one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from difflm.errors import DifflmError

# name -> (module under difflm.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "Train a model from a recipe (YAML + dotted overrides)."),
    "sample": ("sample", "Generate from a checkpoint (iterative unmasking, or AR for causal models)."),
    "eval": ("eval", "Evaluate a checkpoint (ELBO perplexity bound, AR loss, system metrics)."),
    "compare": ("compare", "Diffusion vs autoregressive on one prompt: side-by-side GIF, speed."),
    "data": ("data", "List or fetch the named corpora."),
    "convert": ("convert", "Convert a Hugging Face checkpoint into a difflm diffusion model."),
    "inspect": ("inspect", "Compare key names and shapes of two checkpoints."),
    "serve": ("serve", "OpenAI-compatible HTTP server with batched sampling and a live playground."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflm", description="Diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"difflm.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DifflmError as err:
        print(f"difflm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
