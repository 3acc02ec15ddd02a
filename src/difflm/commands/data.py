"""`difflm data list | fetch NAME [--from PATH]`: named corpora with checksums."""

from __future__ import annotations

import argparse

from difflm.data.corpora import CORPORA, fetch_corpus, search_dirs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="list the named corpora and where they are looked for")
    fetch = sub.add_parser("fetch", help="put a verified copy of a corpus in the cache")
    fetch.add_argument("name", choices=sorted(CORPORA))
    fetch.add_argument(
        "--from", dest="source", default=None, help="a local copy to verify and use instead of downloading"
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, corpus in sorted(CORPORA.items()):
            print(f"{name}: {corpus.filename} (md5 {corpus.md5})")
        print("looked for in: " + ", ".join(str(p) for p in search_dirs()))
        return 0
    path = fetch_corpus(args.name, args.source)
    print(f"{args.name}: {path}")
    return 0
