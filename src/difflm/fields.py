"""`opt`: a dataclass field with its help text (and choices) beside the declaration.

The one way a config or options field is declared: `--help` (recipes, `difflm sample` / `eval`
flags) is read from it. Its own module, below `config` and `models`: model configs declare their
fields with it, and `config` looks the model families up in `difflm.models`, so neither may import
the other's module.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

REQUIRED: Any = dataclasses.MISSING  # `opt(REQUIRED, "...")`: a field with no default


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    metavar: Any = None,
    aliases: dict[str, str] | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with help text (and choices, a command-line metavar, and old names of a
    choice that configs may still hold: `aliases`, old -> new) kept next to its declaration; a list,
    dict or dataclass default is copied for every instance."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    for key, value in (("metavar", metavar), ("aliases", aliases)):
        if value is not None:
            metadata[key] = value
    if (
        isinstance(default, (list, dict))
        or dataclasses.is_dataclass(default)
        and not isinstance(default, type)
    ):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def like(cls: type, name: str, **changes: Any) -> Any:
    """The field `name` of dataclass `cls` declared again (its default, help and choices), with
    `changes` (default=, help=) applied: options that mirror a config field keep one text."""
    (source,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = source.default if source.default_factory is dataclasses.MISSING else source.default_factory()
    return opt(
        changes.get("default", default),
        changes.get("help", source.metadata["help"]),
        source.metadata.get("choices"),
        source.metadata.get("metavar"),
    )
