"""`opt`: a dataclass field with its help text (and choices) beside the declaration.

Its own module, below `config` and `models`: model configs declare their fields with it, and
`config` looks the model families up in `difflm.models`, so neither may import the other's module.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (and choices) kept next to its declaration."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)
