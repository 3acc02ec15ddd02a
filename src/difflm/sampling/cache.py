"""KV-cache policies for block-wise masked-diffusion sampling (Fast-dLLM's prefix and dual caches).

Within a block, the tokens outside it barely change between steps (the prefix is final, the suffix
is all masks), so their keys and values can be reused. `BlockForward` runs the denoiser for the
engine under one of four policies:

- none:   every step is a full forward over [0, L).
- prefix: the first step of a block is a full forward that fills the cache; later steps feed
          [lo, L) (the block and the suffix) at position_offset lo and attend over cached [0, lo)
          plus the fresh keys of [lo, L).
- dual:   the same refresh; later steps feed only the block [lo, hi) and attend over all L slots,
          reusing the prefix AND the suffix keys of the refresh pass (stale for the suffix).
- delayed: dual without the full refresh after the first block: a block's first step feeds the
          previous block and this one ([previous lo, hi)), so the finished block's keys are
          written once more, now that its tokens are final, and every other key stays as it was
          last written (the prompt's and the masked suffix's from the first pass). The full
          refresh passes are a large share of a cached decode at batch 1 on a CPU; the keys they
          renew barely move (docs/results/distill: the same gen-ppl).

Under prefix and dual the first step of every block is therefore exact; later steps (and under
delayed every step after the first) are approximations: some cached keys were computed from
tokens that have since been revealed (in a bidirectional model every key depends on every token).

Block-causal decoding (`block_causal=True`, block diffusion / BD3): no position sees a later block,
so prefix and dual caches coincide and are exact. The first call of a block feeds the blocks that
finished since the last refresh plus the current one ([clean_until, hi)), writing the finished
blocks' keys once, as the training's clean stream computes them; later calls feed the block only
(a shifted model also the final token before it, whose output gives the block's first logits). Nothing written by a non-refresh step is
needed afterwards, so when rows reach the end of their block at different steps (threshold
decoding in a batch) the waiting rows simply ride along in the block's window (their outputs are
dropped), which costs less than copying the active rows' cache at every step; a refresh or prefix
step over a subset of rows runs on a gathered copy and writes the rows back.

A model supports the cache when it declares `supports_kv_cache` (models/protocol.py: its forward
takes `position_offset`, `kv_cache` and `attend_len`), as difflm's `Transformer` and the
Qwen3-LLaDA denoiser do; the cache is a `KVCache` of exactly the sequence length L. Hugging Face masked LMs (BERT, RoBERTa) have no such path: they run with
cache=none (threshold / factor decoding still apply). SGDD decodes one block, so a cache has
nothing to reuse there.

A model with `logits_shift = 1` (Dream: position i's logits come from position i-1's output) is
fed from lo - 1 in the cached steps, so the block's first logits stay exact. A shifted BD3 model
with `lookahead_row` reads them instead from a copy of token lo - 1 that sees the block (as it
was trained, models/block_attention.py): `lookahead_window` puts that row just before the block,
in slot lo, and the block one slot up; the next refresh writes the finished block's final keys
to their own slots, so nothing stale is read later.

Under every policy, a model that declares `supports_logits_at` (difflm's Transformer, SGDD,
Qwen3-LLaDA) projects only the block's columns onto the vocabulary instead of all L (greedy
keep-mode steps ask for the block's still-masked positions only, through `want`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.models.layers import KVCache
from difflm.models.protocol import Denoiser, check_denoiser
from difflm.sampling.settings import CACHE_MODES

CACHE_KWARGS = ("position_offset", "kv_cache", "attend_len")


def check_cache(model: Denoiser, mode: str) -> None:
    """Raise DifflmError when `mode` is unknown or a cache is asked of a model without one."""
    if mode not in CACHE_MODES:
        raise DifflmError(f"sample.cache must be one of {list(CACHE_MODES)}, got {mode!r}")
    if mode != "none" and not model.supports_kv_cache:
        raise DifflmError(
            f"sample.cache={mode} needs a model whose forward takes {', '.join(CACHE_KWARGS)} "
            f"(difflm's Transformer); {type(model).__name__} has none: use sample.cache=none"
        )


def query_rows(bias: Tensor | None, start: int, end: int) -> Tensor | None:
    """The additive bias [B|1, 1, Q|1, K] restricted to queries [start, end)."""
    if bias is None or bias.shape[2] == 1:
        return bias
    return bias[:, :, start:end]


def cache_dtype(model: Any) -> torch.dtype:
    """bf16 under CPU/CUDA autocast (keys are produced in it), else the parameters' dtype."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next(model.parameters()).dtype


def _gathered(cache: KVCache, rows: Tensor) -> KVCache:
    """A copy of the cache holding only `rows` (writes to it do not reach `cache`)."""
    sub = copy.copy(cache)
    sub.k = [k[rows] for k in cache.k]
    sub.v = [v[rows] for v in cache.v]
    sub.batch = len(rows)
    return sub


def lookahead_window(x: Tensor, bias: Tensor | None, start: int, lo: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
    """Columns [start, end) of x [b, L] with a lookahead row inserted before column lo (the block's
    first): tokens [b, Q], their positions [Q] (the row: token and position lo - 1) and the bias
    [., 1, Q, end + 1] over the keys in the same order. The row sees what the block's first row
    sees; no row sees it. Under the model's shift its output gives the block's first logits."""
    if bias is None:
        raise DifflmError("a lookahead row needs the block-causal attention bias of the sampler")
    before = torch.arange(start, lo, device=x.device)
    after = torch.arange(lo, end, device=x.device)
    row = torch.tensor([lo], device=x.device)
    tokens = torch.cat([x[:, start:lo], x[:, lo - 1 : lo], x[:, lo:end]], dim=1)
    seen = bias[:, :, torch.cat([before, row, after]), :end]  # the row reads as row lo
    hidden = torch.full_like(seen[..., :1], float("-inf"))
    seen = torch.cat([seen[..., :lo], hidden, seen[..., lo:]], dim=-1)
    return tokens, torch.cat([before, row - 1, after]), seen


class BlockForward:
    """The denoiser's forward under a cache policy; one KVCache per stream (cond / uncond / stacked)."""

    def __init__(self, model: Denoiser, mode: str, length: int, block_causal: bool = False) -> None:
        check_cache(check_denoiser(model), mode)
        self.model, self.mode, self.length, self.block_causal = model, mode, length, block_causal
        self.packed = model.supports_logits_at
        self.shift = model.logits_shift  # Dream: logits of i come from output i-1
        self.lookahead = bool(getattr(model, "lookahead_row", False))  # block_attention.py
        if self.lookahead and not block_causal:
            raise DifflmError(
                "this block-diffusion model reads each block's first token from a lookahead row, "
                "which only block-causal decoding feeds: sample it with sample.block_causal=true"
            )
        self.caches: dict[str, KVCache] = {}
        self.fresh: set[str] = set()  # streams refreshed since the current block started
        self.block_start: dict[str, int] = {}  # the lo of each stream's current block
        self.clean_until: dict[str, int] = {}  # block-causal: slots [0, n) hold final keys

    def new_block(self) -> None:
        """The next call of every stream is a full refresh pass."""
        self.fresh.clear()

    def feeds_block_only(self) -> bool:
        """True when the next calls feed just the block's window of an already refreshed cache
        (dual, block-causal). For a subset of rows, feeding every row's window then costs less
        than gathering the active rows' cache (a copy of every layer's keys and values per step),
        and the rows that wait only rewrite slots the next refresh rewrites anyway."""
        return bool(self.fresh) and (self.block_causal or self.mode in ("dual", "delayed"))

    def __call__(
        self,
        x: Tensor,
        bias: Tensor | None,
        kwargs: dict,
        lo: int,
        hi: int,
        stream: str = "cond",
        rows: Tensor | None = None,
        batch: int | None = None,
        want: Tensor | None = None,
    ) -> Tensor:
        """Logits [b, hi-lo, V] of columns [lo, hi) for x [b, L], or packed [N, V] at the true
        positions of `want` [b, hi-lo].

        rows: which rows of the stream's full batch (`batch` rows) x holds; None = all of them.
        """
        if self.mode == "none" and self.lookahead and lo > 0:
            tokens, positions, seen = lookahead_window(x, bias, 0, lo, x.shape[1])
            return self._logits(tokens, lo + 1, hi + 1, want, attention_bias=seen, position_ids=positions, **kwargs)
        if self.mode == "none":
            return self._logits(x, lo, hi, want, attention_bias=bias, **kwargs)
        cache = self._cache(stream, len(x) if batch is None else batch)
        if self.block_causal:
            return self._block_causal(x, bias, kwargs, lo, hi, stream, cache, rows, want)
        block_start = stream not in self.fresh
        since = lo  # the first column whose keys this call writes (before the shift)
        if block_start:
            self.fresh.add(stream)
            since = self.block_start.get(stream, 0) if self.mode == "delayed" else 0
            self.block_start[stream] = lo
        # block start: one exact pass over [0, L) fills the cache (delayed: after the first block,
        # from the previous block's start to this block's end); later steps feed the block (prefix:
        # the block and everything after it)
        end = self.length if self.mode == "prefix" or since == 0 else hi
        start = max(since - self.shift, 0)  # a shifted model also needs the position before the block
        target = cache if rows is None else _gathered(cache, rows)
        out = self._logits(
            x[:, start:end],
            lo - start,
            hi - start,
            want,
            attention_bias=query_rows(bias, start, end),
            position_offset=start,
            kv_cache=target,
            attend_len=self.length,
            **kwargs,
        )
        if block_start and rows is not None:  # keys later steps read: into the stream's cache
            for layer in range(cache.n_layer):
                cache.k[layer][rows], cache.v[layer][rows] = target.k[layer], target.v[layer]
        return out

    def _block_causal(
        self,
        x: Tensor,
        bias: Tensor | None,
        kwargs: dict,
        lo: int,
        hi: int,
        stream: str,
        cache: KVCache,
        rows: Tensor | None,
        want: Tensor | None,
    ) -> Tensor:
        """One exact cached call: keys of finished blocks are final, later blocks are never seen."""
        refresh = stream not in self.fresh
        lookahead = self.lookahead and lo > 0
        # a shifted model reads the block's first token from the final token before it, or from
        # its lookahead row (that token again, in the slot before the block's, which moves up one)
        start = self.clean_until.get(stream, 0) if refresh else lo if lookahead else max(lo - self.shift, 0)
        target = cache if rows is None else _gathered(cache, rows)
        if lookahead:
            tokens, positions, seen = lookahead_window(x, bias, start, lo, hi)
            kwargs = {**kwargs, "position_ids": positions}
        else:
            tokens, seen = x[:, start:hi], None if bias is None else bias[:, :, start:hi, :hi]
        first = lo - start + int(lookahead)  # the block's first column in `tokens`
        out = self._logits(
            tokens,
            first,
            first + hi - lo,
            want,
            attention_bias=seen,
            position_offset=start,
            kv_cache=target,
            attend_len=start + tokens.shape[1],
            **kwargs,
        )
        if refresh:
            self.fresh.add(stream)
            self.clean_until[stream] = lo
            if rows is not None:
                for layer in range(cache.n_layer):
                    cache.k[layer][rows], cache.v[layer][rows] = target.k[layer], target.v[layer]
        return out

    def _logits(self, x: Tensor, lo: int, hi: int, want: Tensor | None, **kwargs) -> Tensor:
        """The model's logits [b, hi-lo, V] at columns [lo, hi) of its input x [b, Q] (packed
        [N, V] at `want` [b, hi-lo] when given); only those positions go through the vocabulary
        projection when the model supports `logits_at`."""
        if not self.packed:
            out = self.model(x, **kwargs)[:, lo:hi]  # [b, S, V]
            return out if want is None else out[want]
        at = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        at[:, lo:hi] = True if want is None else want
        out = self.model(x, logits_at=at, **kwargs)  # [N, V]
        return out if want is not None else out.view(len(x), hi - lo, -1)

    def _cache(self, stream: str, batch: int) -> KVCache:
        if stream not in self.caches:
            spare = int(self.lookahead)  # a lookahead row moves its block up one slot: one more at the end
            self.caches[stream] = KVCache.for_model(
                self.model, batch, max_len=self.length + spare, dtype=cache_dtype(self.model)
            )
        return self.caches[stream]
