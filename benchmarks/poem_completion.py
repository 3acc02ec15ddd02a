"""Poem-completion benchmark in one command: masked-diffusion vs autoregressive fill-in on unseen poems.

    python benchmarks/poem_completion.py --diffusion RUN_DIR --ar RUN_DIR --split-dir SPLIT \
        --out-dir OUT [--n-poems 100] [--ratios 0.1,...,0.6] [--candidates 3]

The same as `difflm eval poem-completion ...` (protocol in difflm.evaluate.poem_completion):
writes OUT/results.csv, OUT/results.json, OUT/table.md and OUT/plot.png and prints the table. Both checkpoints must
share a tokenizer and be trained on the split's train.jsonl (examples/poems.sh does all steps).
"""

from __future__ import annotations

import argparse
import sys

from difflm.errors import DifflmError
from difflm.evaluate import poem_completion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    poem_completion.add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the masked positions")
    parser.add_argument("--batch-size", type=int, default=50, help="poems per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = parser.parse_args(argv)
    try:
        return poem_completion.main(args)
    except DifflmError as err:
        print(f"poem_completion: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
