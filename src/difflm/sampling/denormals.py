"""Flushing float32 denormals to zero while a decode runs.

Some decoders work with large activations: the SGDD decoder's MLP inputs reach |x| ~ 100, where
the tanh inside GELU's tanh form passes through denormal intermediates, which x86 cores compute in
microcode, ~6x slower (230 against 37 us on the activations of one [2, 8, 1024] call, a scratch
timing). Flushing them to zero changed no decoded token in the measured cases and took ~5 ms off a
guided batch-1 decode (docs/results/sgdd/denormals_ab.txt).

The setting is per thread (the x86 MXCSR register of the calling thread) and PyTorch has no getter,
so `flush_denormals` reads it with a probe and puts it back as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALLEST_NORMAL = 1.1754943508222875e-38  # float32


def denormals_flushed() -> bool:
    """Whether this thread flushes float32 denormals to zero (half the smallest normal becomes 0)."""
    return float(torch.tensor([SMALLEST_NORMAL]).mul(0.5)) == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormals to zero on this thread inside the block; the previous setting after it."""
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
