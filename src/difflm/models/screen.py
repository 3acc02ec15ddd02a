"""The k most likely tokens of a few hidden states over a whole vocabulary, screened in bfloat16.

A shortlist (SGDD decoding keeps each position's 64 likeliest tokens) needs the logits of every
token once per sentence. That [V, C] product with a few rows is bound by reading the weight: for
30,522 x 256 float32 it took ~6.5 ms on this project's CPU, ~2.8 ms from a bfloat16 copy (a
scratch timing; docs/results/sgdd/screen_ab.txt has the decode's measured gain). On a
CPU with native bfloat16 the logits are therefore screened in bfloat16 (the copy is kept while the
weight is unchanged) and only each row's SCREEN * k best are scored in float32, which pick the k:
the same k unless one of them ranks below SCREEN * k in bfloat16 (SGDD decoding wrote the same
text in 30/30 sentences with and without the screen, docs/results/sgdd/screen_ab.txt).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

from difflm.models.layers import project

SCREEN = 2  # candidates kept by the bfloat16 screen, per token wanted

_copies: dict[int, tuple[int, Tensor]] = {}  # id(weight) -> (its version when copied, the copy)


def top_tokens(h: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """Indices [N, k] of the k largest of project(h, weight, bias) [N, V] in each row of h [N, C]."""
    if not _screens(h, weight, k):
        return project(h, weight, bias).topk(k, dim=-1).indices
    rough = project(h.to(torch.bfloat16), _bf16(weight), None if bias is None else bias.to(torch.bfloat16))
    candidates = rough.topk(SCREEN * k, dim=-1).indices  # [N, SK]
    exact = torch.einsum("nkc,nc->nk", weight[candidates], h)  # [N, SK], float32
    if bias is not None:
        exact = exact + bias[candidates]
    return candidates.gather(1, exact.topk(k, dim=-1).indices)


def _screens(h: Tensor, weight: Tensor, k: int) -> bool:
    """Screen float32 inference on a CPU with native bfloat16, when it leaves most tokens out."""
    cpu = h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
    return cpu and SCREEN * k * 8 <= weight.shape[0] and _native_bf16()


@functools.cache
def _native_bf16() -> bool:
    """True where oneDNN runs bfloat16 natively (AVX-512 BF16 / AMX); elsewhere it is emulated."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16(weight: Tensor) -> Tensor:
    """A bfloat16 copy of weight, made again when the weight has changed in place (training)."""
    kept = _copies.get(id(weight))
    if kept is None:  # (a tensor cannot key a WeakKeyDictionary: == on tensors is elementwise)
        weakref.finalize(weight, _copies.pop, id(weight), None)
    if kept is None or kept[0] != weight._version:
        kept = (weight._version, weight.detach().to(torch.bfloat16))
        _copies[id(weight)] = kept
    return kept[1]
