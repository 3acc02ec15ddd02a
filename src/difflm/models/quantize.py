"""int8 weights for inference on the CPU: PyTorch's dynamic quantization of the linear layers.

At batch 1 a small decoder is bound by reading its weights, not by arithmetic: the lightweight
SGDD decoder streams ~7 MB of float32 weights through a 2 MB L2 cache at every forward. Stored
as int8 (one scale per output row) they are a quarter of those bytes; each call quantizes its
input on the fly and returns float32. The outputs move slightly, so decoded text can change
(docs/results/sgdd/int8.md measures how much). torch.ao's eager quantization is deprecated in
favour of torchao but present in every torch this project allows (< 2.14); its warnings are
silenced here, where the choice is made.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from difflm.errors import DifflmError


def int8_linears(model: nn.Module, keep: Iterable[str] = ()) -> int:
    """Replace every nn.Linear of `model` (except those named in `keep`, e.g. a head whose weight
    is also read directly) by a dynamically quantized int8 one, in place; returns how many."""
    if next(model.parameters()).device.type != "cpu":
        raise DifflmError("int8 weights run on the CPU only; drop --int8 on a GPU")
    kept, count = set(keep), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation of torch.ao's eager quantization
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if type(child) is nn.Linear and full not in kept:
                    child.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
                    setattr(parent, child_name, torch.ao.nn.quantized.dynamic.Linear.from_float(child))
                    count += 1
    return count
