"""A model soup: the uniform average of the weights of several fine-tunes of one model.

Runs that start from the same checkpoint tend to stay in one basin of the loss, so the average of
their weights is itself a good model, and often a better one than any of them (Wortsman et al.,
2022, "Model soups"): a regulariser that costs no training step, for a model that memorises its
data. `difflm export A B C OUT` writes the soup of A, B and C as a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from difflm.errors import DifflmError
from difflm.pretrained import Pretrained


def soup(ingredients: Sequence[Pretrained]) -> nn.Module:
    """The first ingredient's model holding the mean of every ingredient's floating tensors
    (summed in float64, stored in the first one's dtypes). All must share task, model config and
    tokenizer; integer buffers must be equal."""
    if not ingredients:
        raise DifflmError("a soup needs at least one checkpoint")
    first = ingredients[0]
    for other in ingredients[1:]:
        _check_compatible(first, other)
    states = [pre.model.state_dict() for pre in ingredients]
    mean = {}
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            total = sum(state[name].double() for state in states)
            mean[name] = (total / len(states)).to(tensor.dtype)
        elif any(not torch.equal(state[name], tensor) for state in states[1:]):
            raise DifflmError(f"checkpoints differ in the integer tensor '{name}': they cannot be averaged")
        else:
            mean[name] = tensor
    first.model.load_state_dict(mean)
    return first.model


def _check_compatible(first: Pretrained, other: Pretrained) -> None:
    """Raise DifflmError naming the first thing `other` does not share with `first`."""
    if other.config.task != first.config.task:
        raise DifflmError(
            f"{other.path} is a {other.config.task} checkpoint and {first.path} a {first.config.task} one: "
            "average checkpoints of one task"
        )
    a, b = _fields(first.config.model), _fields(other.config.model)
    differ = [key for key in a if a[key] != b.get(key)]
    if differ:
        raise DifflmError(
            f"{other.path} has model.{differ[0]}={b.get(differ[0])!r}, {first.path} {a[differ[0]]!r}: "
            "average fine-tunes of one model"
        )
    if other.tokenizer.fingerprint() != first.tokenizer.fingerprint():
        raise DifflmError(f"{other.path} and {first.path} have different tokenizers: they cannot be averaged")


def _fields(model_config) -> dict:
    return dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
