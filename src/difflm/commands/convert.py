"""`difflm convert --from qwen3 SRC DST`: turn a Hugging Face checkpoint into a diffusion checkpoint."""

from __future__ import annotations

import argparse
import pkgutil

from difflm.errors import DifflmError

CONVERTERS = {"qwen3": "difflm.convert:convert_qwen3"}  # imported when used (transformers is slow)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source_family",
        choices=sorted(CONVERTERS),
        required=True,
        help="family of the source checkpoint (qwen3 -> Qwen3-LLaDA)",
    )
    parser.add_argument("src", help="source checkpoint folder (config.json, safetensors, tokenizer)")
    parser.add_argument("dst", help="output folder (must not exist or be empty)")
    parser.add_argument("--mask-token", default="<|mask|>", help="mask token added when absent")


def run(args: argparse.Namespace) -> int:
    if not args.mask_token.strip():
        raise DifflmError("--mask-token is empty; give the mask token's text, e.g. <|mask|>")
    convert = pkgutil.resolve_name(CONVERTERS[args.source_family])
    report = convert(args.src, args.dst, mask_token=args.mask_token)
    print(f"wrote {report.dst}")
    if report.has_tokenizer:
        added = "added to the tokenizer" if report.token_added else "already in the tokenizer"
        print(f"mask token {report.mask_token!r} ({added}): id {report.mask_token_id}")
    else:
        print(f"mask token id {report.mask_token_id} (no tokenizer in SRC: give your tokenizer this id)")
    if report.vocab_after != report.vocab_before:
        print(f"embedding resized {report.vocab_before} -> {report.vocab_after} rows (new rows = mean row)")
    return 0
