"""The autoregressive baseline: left-to-right decoding with a KV cache, one token per forward.

Two backends share one loop: difflm's `Transformer` built with `causal=True` (its `KVCache`) and
any Hugging Face causal LM (its cache keyword, `use_cache=True`). Tokens are drawn with the same
`draw_tokens` as the diffusion engine, and the result is a `SampleResult` whose trace has one
step per token, so `difflm compare` can animate both side by side.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.sampling.draw import Generators, draw_tokens
from difflm.sampling.trace import Trace
from difflm.sampling.unmask import SampleResult, left_pad

NOT_YET = -1  # placeholder id in the trace for positions not generated yet


class _HFDecoder:
    """Incremental forward for a Hugging Face causal LM; returns the last position's logits [B, V].

    Position ids come from the attention mask so left padding does not shift positions.
    """

    def __init__(self, model: Any, mask: Tensor) -> None:
        self.model, self.mask, self.past = model, mask, None
        self.cache_key = cache_keyword(model)
        self.next_pos = mask.sum(1, keepdim=True)  # [B, 1]

    def __call__(self, ids: Tensor) -> Tensor:
        if self.past is None:
            positions = (self.mask.cumsum(1) - 1).clamp(min=0)  # [B, P]
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
            positions, self.next_pos = self.next_pos, self.next_pos + 1
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_key: self.past},
        )
        self.past = getattr(out, self.cache_key)
        return out.logits[:, -1].float()


def cache_keyword(model: Any) -> str:
    """The name a Hugging Face causal LM takes and returns its KV cache under: `cache` since
    transformers 5.24 (which deprecates `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _CacheDecoder:
    """Incremental forward for difflm's causal Transformer over a preallocated KVCache.

    The bias hides padded keys; a padded query still sees itself, so no attention row is empty
    (an all -inf row would give NaN and poison later layers through the cache).
    """

    def __init__(self, model: Any, mask: Tensor, max_len: int) -> None:
        from difflm.models.layers import KVCache

        self.model, self.offset = model, 0
        self.keys = torch.cat(
            [mask.bool(), mask.new_ones(mask.shape[0], max_len - mask.shape[1]).bool()], dim=1
        )
        self.cache = KVCache.for_model(model, mask.shape[0], max_len)

    def __call__(self, ids: Tensor) -> Tensor:
        s, Q = self.offset, ids.shape[1]
        visible = self.keys[:, None, None, : s + Q].expand(-1, 1, Q, -1).clone()  # [B, 1, Q, s+Q]
        rows = torch.arange(Q, device=ids.device)
        visible[:, 0, rows, s + rows] = True
        bias = torch.zeros(visible.shape, device=ids.device).masked_fill(~visible, float("-inf"))
        logits = self.model(ids, attention_bias=bias, position_offset=s, kv_cache=self.cache)  # [B, Q, V]
        self.offset += Q
        return logits[:, -1].float()


class _RecomputeDecoder:
    """Cache-less forward for any causal LM `model(ids [B, L]) -> logits [B, L, V]` (e.g. DFGPT, or
    an HF causal LM's `.logits`).

    Every step reruns the last `block_size` tokens (nanoGPT's sliding window), so generation may
    run past the model's length. It has no attention bias, hence no left padding.
    """

    def __init__(self, model: Any, mask: Tensor) -> None:
        if not bool(mask.all()):
            raise DifflmError("generation without a KV cache needs prompts of equal length (no padding)")
        self.model, self.window, self.ids = model, model.max_length, None

    def __call__(self, ids: Tensor) -> Tensor:
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)  # [B, L]
        out = self.model(self.ids[:, -self.window :])
        return getattr(out, "logits", out)[:, -1].float()  # [B, V] (HF models return an output object)


def _decoder(model: Any, mask: Tensor, max_len: int, use_cache: bool = True):
    from transformers import PreTrainedModel

    if not use_cache:
        return _RecomputeDecoder(model, mask)
    if isinstance(model, PreTrainedModel):
        return _HFDecoder(model, mask)
    config = getattr(model, "config", None)
    if not getattr(config, "causal", False):
        raise DifflmError(
            "generate_ar needs a causal model: difflm Transformer with causal=true or a Hugging Face causal LM"
        )
    if max_len > model.max_length:
        raise DifflmError(
            f"prompt + max_new_tokens = {max_len} exceeds the model's length {model.max_length} (its block_size); "
            "shorten the prompt or lower max_new_tokens"
        )
    return _CacheDecoder(model, mask, max_len)


@torch.no_grad()
def generate_ar(
    model: Any,
    prompt_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: Generators = None,
    attention_mask: Tensor | None = None,
    trace: bool = False,
    use_cache: bool = True,
    suppress_tokens: Sequence[int] = (),
) -> SampleResult:
    """Decode max_new_tokens after each prompt row [B, P] -> tokens [B, P+N] (left padded).

    After a row emits eos_token_id its remaining positions are EOS; decoding stops early once every
    row has. forward_passes counts model calls (the prefill is one). `suppress_tokens` are never
    drawn (e.g. a tokenizer's mask and pad ids). `use_cache=False` recomputes
    the last block_size tokens every step (models without a KV cache; unpadded prompts only).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise DifflmError(f"prompt_ids must be [batch, length >= 1], got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise DifflmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_p is not None and not 0.0 < top_p <= 1.0):
        raise DifflmError(f"need temperature >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    ids, mask = left_pad(prompt_ids, attention_mask)
    B, P = ids.shape
    decode = _decoder(model, mask, P + max_new_tokens, use_cache)
    fill_value = 0 if eos_token_id is None else eos_token_id  # every slot is written unless EOS ends early
    tokens = torch.cat([ids, ids.new_full((B, max_new_tokens), fill_value)], dim=1)  # [B, P+N]
    full_mask = torch.cat([mask, torch.ones_like(tokens[:, P:])], dim=1)
    record, shown = None, None
    if trace:
        shown = torch.cat([ids.cpu(), torch.full((B, max_new_tokens), NOT_YET)], dim=1)  # [B, P+N]
        fill = torch.zeros(shown.shape, dtype=torch.bool)
        fill[:, P:] = True
        record = Trace(shown.clone(), fill, full_mask.cpu(), NOT_YET)
    logits, passes = decode(ids), 1  # [B, V]
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[list(suppress_tokens)] = True
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        if suppress_tokens:
            logits = logits.masked_fill(banned, float("-inf"))
        chosen, probs = draw_tokens(logits, temperature, top_k, top_p, generator)  # [B], [B, V]
        if eos_token_id is not None:
            chosen = chosen.masked_fill(done, eos_token_id)
            done |= chosen == eos_token_id
        tokens[:, P + t] = chosen
        if record is not None:
            before = shown.clone()
            shown[:, P + t] = chosen.cpu()
            conf = torch.zeros(shown.shape)
            conf[:, P + t] = probs.gather(1, chosen[:, None]).squeeze(1).cpu()
            record.record(shown, before, conf, 0, t)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits, passes = decode(chosen[:, None]), passes + 1
    return SampleResult(tokens, record, passes, full_mask)
