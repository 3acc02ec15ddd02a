"""`difflm` command line: a dict of sub-commands, each a module with `add_arguments` and `run`.

The CLI is thin on purpose: every sub-command parses its arguments and calls one library
function. Only the module of the command being run is imported, and command modules import torch
and transformers inside `run`, so `difflm --help` and `difflm sample --help` stay fast.

Threads: torch's default (one per core), with OpenMP's passive wait for the inference commands
(`PASSIVE_THREADS`) unless OMP_WAIT_POLICY is set; OMP_NUM_THREADS=1 is the fastest for small
models at batch 1.

Errors: a `DifflmError` (bad input the user can fix) or an `OSError` (a path that cannot be read or
written) is printed on one line and exits 2. Any other exception is a bug: one line naming it and a
hint to rerun with `--debug` (anywhere on the command line), which shows the traceback; exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from difflm.errors import DifflmError

# name -> (module under difflm.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "Train a model from a recipe (YAML + dotted overrides)."),
    "sample": ("sample", "Generate from a checkpoint (iterative unmasking, or AR for causal models)."),
    "eval": ("eval", "Evaluate a checkpoint (ELBO perplexity bound, AR loss, system metrics)."),
    "systems": ("systems", "List the systems (recipe tasks) and what each can do: train, eval, sample."),
    "compare": ("compare", "Diffusion vs autoregressive on one prompt: side-by-side GIF, speed."),
    "data": ("data", "List or fetch the named corpora."),
    "convert": ("convert", "Convert a Hugging Face checkpoint into a difflm diffusion model."),
    "inspect": (
        "inspect",
        "Compare key names and shapes of two checkpoints, or map a snapshot's keys onto difflm's model.",
    ),
    "export": ("export", "Copy a checkpoint for sharing (bf16, no optimizer state), or average several."),
    "serve": ("serve", "OpenAI-compatible HTTP server with batched sampling and a live playground."),
}
DEBUG_FLAG = "--debug"
# Decoding runs many small forwards: OpenMP threads that spin while they wait lose the core to any
# other busy process (docs/results/threads: 2 threads next to a busy process sample at 67 tok/s
# spinning, 175 passive; quiet, passive costs ~10%). Training keeps the spinning default.
PASSIVE_THREADS = ("sample", "eval", "compare", "serve")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (none for the top-level help)."""
    parser = argparse.ArgumentParser(
        prog="difflm",
        description="Diffusion language models.",
        epilog=f"{DEBUG_FLAG} (anywhere): show the traceback of an unexpected error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"difflm.commands.{module_name}")
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    if overrides is not None and args.recipe is not None and all(_is_override(a) for a in extra):
        args.overrides = overrides + extra  # `train R --print-config model.n_layer=2`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("DIFFLM_DEBUG") == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    args = parse_args(argv)
    if args.command in PASSIVE_THREADS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP, below
    try:
        return int(args._run(args) or 0)
    except DifflmError as err:
        _error(args.command, str(err))
        return 2
    except KeyboardInterrupt as err:
        print(f"difflm {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as err:
        if debug:
            raise
        _error(args.command, f"{err.strerror or err}: {err.filename or ''}".rstrip(": "))
        return 2
    except Exception as err:
        if debug:
            raise
        _error(
            args.command,
            f"unexpected {type(err).__name__}: {_first_line(err)} "
            f"(a bug: rerun with {DEBUG_FLAG} for the traceback and report it)",
        )
        return 1


def _error(command: str, message: str) -> None:
    print(f"difflm {command}: error: {' '.join(message.split())}", file=sys.stderr)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
