"""`difflm train RECIPE [key=value ...]`: train any system from a recipe with dotted overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflm.config import RunConfig, describe, dump_yaml, load_config
from difflm.errors import DifflmError


def resolve_recipe(name: str) -> Path:
    """A path, or the name of a shipped recipe (`shakespeare_char` -> recipes/shakespeare_char.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).resolve().parents[3] / "recipes"
    for candidate in (shipped / name, shipped / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml"))) if shipped.is_dir() else "none found"
    raise DifflmError(f"unknown recipe '{name}': pass a YAML path or a shipped recipe ({known})")


def help_config(recipe: str | None, overrides: list[str]) -> str:
    """Keys of the run config, and of the model family the recipe picks (the transformer by default)."""
    cfg = load_config(resolve_recipe(recipe) if recipe else None, overrides)
    lines = [line for line in describe(RunConfig) if not line.startswith("model ")]
    return "\n".join(lines + describe(type(cfg.model), "model."))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML path or shipped recipe name")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. model.n_layer=4 train.max_steps=50"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its default, choices and help"
    )


def run(args: argparse.Namespace) -> int:
    from difflm.systems.registry import build_run
    from difflm.train.trainer import train

    if args.help_config:
        print(help_config(args.recipe, args.overrides))
        return 0
    if args.recipe is None:
        raise DifflmError("no recipe given: difflm train RECIPE [key=value ...] (see recipes/)")
    cfg = load_config(resolve_recipe(args.recipe), args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    state = train(cfg, build_run(cfg))
    print(
        f"done: step {state.step}, val loss {state.val_loss:.4f}, checkpoints in {cfg.train.output_dir}/checkpoints"
    )
    return 0
