"""Command-line flags made from a typed options dataclass, and the dataclass back from the parsed flags.

Each field declared with `opt(...)` becomes `--field-name`: its help, default, choices and metavar
come from the declaration, its kind from the annotation (`bool`: a switch, `int` / `float` / `str`
(or `| None`): one value, `list[str] | None`: repeatable, `tuple[str, str] | None`: two values).
So `difflm sample` / `eval` and the library functions they call share one list of settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
SCALARS = (int, float, str)


def _kind(annotation: Any) -> dict:
    """argparse keywords for a field's annotation (`X | None` is X, the default None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
        args = list(typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": "store_true"}
    if origin is list:
        return {"action": "append", "type": args[0]}
    if origin is tuple:
        return {"nargs": len(args), "type": args[0]}
    if annotation in SCALARS:
        return {"type": annotation}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One `--flag` per field of the options dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kw = _kind(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if kw.get("action") != "store_true":
            kw["default"] = default
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        parser.add_argument(f"--{f.name.replace('_', '-')}", help=f.metadata["help"].replace("%", "%%"), **kw)


def options_from(cls: type[T], args: argparse.Namespace) -> T:
    """The options dataclass `cls` filled from parsed flags (two-value flags become tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) and _is_tuple(cls, k) else v for k, v in values.items()})


def _is_tuple(cls: type, name: str) -> bool:
    return "nargs" in _kind(typing.get_type_hints(cls)[name])
