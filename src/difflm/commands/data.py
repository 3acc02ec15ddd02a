"""`difflm data list | fetch NAME [--from PATH] | build-poems SRC OUT --seed S | distill AR OUT`:
named corpora with checksums, the seeded disjoint train/dev/test split of a poem JSONL corpus, and an
AR model's continuations (greedy or sampled) as training text for a student (sampling/distill.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflm.data.corpora import CORPORA, fetch_corpus, search_dirs
from difflm.errors import DifflmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="list the named corpora and where they are looked for")
    fetch = sub.add_parser("fetch", help="put a verified copy of a corpus in the cache")
    fetch.add_argument("name", choices=sorted(CORPORA))
    fetch.add_argument(
        "--from", dest="source", default=None, help="a local copy to verify and use instead of downloading"
    )
    poems = sub.add_parser("build-poems", help="write a seeded train/dev/test split of a poem JSONL file")
    poems.add_argument("src", help="poem JSONL: title, author, content per line")
    poems.add_argument("out", help="output folder for train/dev/test.jsonl and split.json")
    poems.add_argument("--seed", type=int, default=0, help="seed of the split")
    distill = sub.add_parser("distill", help="write an AR model's continuations of training prompts")
    distill.add_argument(
        "teacher", help="an autoregressive checkpoint (its training split gives the prompts)"
    )
    distill.add_argument("out", help="the text file to write (train on it with data.block_size=P+N)")
    distill.add_argument(
        "--count", type=int, default=6000, help="examples (a multiple of 10 keeps blocks whole)"
    )
    distill.add_argument("--prompt-length", type=int, default=32, help="P: prompt tokens")
    distill.add_argument("--new-tokens", type=int, default=256, help="N: tokens written after each prompt")
    distill.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy (text for a parallel decoder); 1: the teacher's own samples",
    )
    distill.add_argument("--seed", type=int, default=0, help="seed of the prompts' choice (and of the draws)")
    distill.add_argument("--batch", type=int, default=128, help="prompts decoded at once")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, corpus in sorted(CORPORA.items()):
            print(f"{name}: {corpus.filename} (md5 {corpus.md5})")
        print("looked for in: " + ", ".join(str(p) for p in search_dirs()))
        return 0
    if args.action == "build-poems":
        from difflm.data.poems import build_poems

        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise DifflmError(f"build-poems output '{args.out}' is a file; give a folder")
        counts = build_poems(args.src, args.out, args.seed)
        print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    if args.action == "distill":
        return _distill(args)
    path = fetch_corpus(args.name, args.source)
    print(f"{args.name}: {path}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from difflm.pretrained import load_pretrained
    from difflm.sampling.distill import teacher_examples

    out = Path(args.out)
    if out.exists():
        raise DifflmError(f"{out} exists: give a new file name (nothing is overwritten)")
    teacher = load_pretrained(args.teacher)
    examples = teacher_examples(
        teacher, args.count, args.prompt_length, args.new_tokens, args.seed, args.batch, args.temperature
    )
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        f.writelines(examples)
    partial.replace(out)  # a crash leaves no half-written file under the final name
    length = args.prompt_length + args.new_tokens
    print(
        f"{out}: {args.count} examples of {length} tokens; train with data.path={out} data.block_size={length}"
    )
    return 0
