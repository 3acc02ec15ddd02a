"""An exponential moving average of the trained weights (MDLM's `models/ema.py`, one small class).

After every optimizer step `shadow = decay * shadow + (1 - decay) * param`, starting from the
weights training starts with. Validation and the inference weights (`ema.safetensors` in each
checkpoint) use the average; the raw weights stay in `model.safetensors` beside the optimizer, so
resuming is exact. Only trainable parameters are averaged: frozen ones (LoRA's base) never move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for average, param in zip(self.shadow, self.params, strict=True):
            average.mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        raw = [p.detach().clone() for p in self.params]
        _copy(self.params, self.shadow)
        try:
            yield
        finally:
            _copy(self.params, raw)


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)
