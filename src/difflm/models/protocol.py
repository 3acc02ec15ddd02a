"""The denoiser protocol, written down as types: what samplers, losses and evaluators may ask of a model.

Every model family has one `max_length` (the longest input it takes: `SequenceModel`). A masked
denoiser (every family but Diffusion Forcing's continuous `DFGPT` and the causal `qwen3` that a
Qwen3-LLaDA is converted from) is also a `Denoiser`: called on
token ids it returns logits, and it declares its optional capabilities as plain attributes instead
of having its `forward` signature sniffed:

- `supports_kv_cache`: forward takes `position_offset`, `kv_cache` and `attend_len`, and
  `KVCache.for_model(model, ...)` builds its cache (block-wise caching, `sampling/cache.py`);
- `supports_logits_at`: forward takes `logits_at` (bool [B, L]) and returns packed logits [N, V]
  for its true positions only;
- `logits_shift`: 1 when position i's logits come from position i-1's output (Dream), else 0;
- optionally `supports_row_offsets`: with a cache, `position_offset` may be a LongTensor [B], each
  row at its own positions and slots (block diffusion with rows at different blocks,
  `sampling/ragged.py`); absent means False.

`check_denoiser` turns a model that lacks part of the protocol into a DifflmError naming what to add.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from difflm.errors import DifflmError


@runtime_checkable
class SequenceModel(Protocol):
    """A model with a fixed context: inputs longer than `max_length` tokens are refused."""

    @property
    def max_length(self) -> int: ...


@runtime_checkable
class Denoiser(SequenceModel, Protocol):
    """logits = model(input_ids [B, L], attention_bias=None, t=None, cond=None) -> [B, L, V]."""

    mask_token_id: int | None
    supports_kv_cache: bool
    supports_logits_at: bool
    logits_shift: int

    def __call__(
        self,
        input_ids: Tensor,
        *,
        attention_bias: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        **options: Any,
    ) -> Tensor: ...


DENOISER_MEMBERS = ("mask_token_id", "max_length", "supports_kv_cache", "supports_logits_at", "logits_shift")


def check_denoiser(model: Any) -> Denoiser:
    """`model` itself, or a DifflmError naming the protocol members it lacks."""
    missing = [name for name in DENOISER_MEMBERS if not hasattr(model, name)]
    if missing or not callable(model):
        lacks = ", ".join(missing) or "__call__"
        raise DifflmError(
            f"{type(model).__name__} is not a difflm denoiser: it lacks {lacks}; "
            "declare them as in difflm.models.protocol.Denoiser"
        )
    return model


def max_length_of(model: Any) -> int:
    """`model.max_length`, or a DifflmError saying the model does not declare its context."""
    if not isinstance(model, SequenceModel):
        raise DifflmError(
            f"{type(model).__name__} declares no max_length; give it the property "
            "(difflm.models.protocol.SequenceModel)"
        )
    return int(model.max_length)
