"""`difflm systems`: every system (the `task` of a recipe) with what difflm can do with it."""

from __future__ import annotations

import argparse
import json

from difflm.systems.registry import SYSTEMS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per system")


def run(args: argparse.Namespace) -> int:
    width = max(map(len, SYSTEMS))
    for system in SYSTEMS.values():
        can = system.abilities()
        if args.json:
            print(json.dumps({"task": system.name, "can": can, "description": system.description}))
        else:
            print(f"{system.name:<{width}}  {' '.join(f'{a:<6}' for a in can)}  {system.description}")
    return 0
