"""`difflm data list | fetch NAME [--from PATH] | build-poems SRC OUT --seed S`: named corpora with
checksums, and the seeded disjoint train/dev/test split of a poem JSONL corpus."""

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
    path = fetch_corpus(args.name, args.source)
    print(f"{args.name}: {path}")
    return 0
