"""Block diffusion with every row at its own block: a row moves on as soon as its block is filled.

The block-by-block engine (`unmask.py`) keeps a batch in step: a block ends when its slowest row
has filled it, so under threshold decoding the rows that finished first wait, and a batch reveals
barely more than one token a forward where a single row reveals two or three. Here each row has its
own current block. Every step feeds each row a window of its previous block and its current one,
at that row's own positions and cache slots (`position_offset` [B], models/protocol.py:
`supports_row_offsets`). The previous block is final, so writing its keys again gives the keys it
already had; that rewrite is how a row that has just moved on writes the block it finished, as the
block-causal cache (`sampling/cache.py`) does with its refresh. The first step feeds the prompt and
the first block. Each row draws once a step while it decodes, as in the block-by-block engine, so a
row's tokens do not depend on the rest of the batch; rows that are done re-feed their last window
until every row is, their outputs unused.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from torch import Tensor

from difflm.models.layers import KVCache
from difflm.sampling.cache import cache_dtype
from difflm.sampling.draw import Generators, rows_of
from difflm.sampling.reveal import draw_block, reveal_count, reveal_mask
from difflm.sampling.settings import SampleConfig


def ragged_start(model: Any, cfg: SampleConfig, fill: Tensor, plain: bool) -> int | None:
    """The first generated column P when this run can go row by row, else None.

    It does when cfg.rows_apart asks and can for block-causal decoding with a cache under Fast-dLLM's rule (steps = 0: each block runs
    until filled), several rows, no guidance or EOS handling and a `plain` run (no model kwargs,
    no trace), on a model that takes per-row offsets and has no lookahead row, when every row
    generates the same suffix [P, L) of whole blocks.
    """
    K = cfg.block_length
    simple = cfg.rows_apart and cfg.steps == 0 and cfg.cfg_scale == 0 and cfg.eos_mode == "none" and plain
    if not (cfg.block_causal and cfg.cache != "none" and simple and K and len(fill) > 1):
        return None
    if not getattr(model, "supports_row_offsets", False) or getattr(model, "lookahead_row", False):
        return None
    L = fill.shape[1]
    P = int(fill[0].long().argmax())
    suffix = torch.arange(L, device=fill.device) >= P
    return P if P % K == 0 and (L - P) % K == 0 and bool((fill == suffix).all()) else None


def ragged_steps(
    model: Any, x: Tensor, real: Tensor, P: int, cfg: SampleConfig, mask_id: int, generator: Generators
) -> Generator[tuple[Tensor, int, int], None, int]:
    """Fill columns [P, L) of x [B, L] in place, block by block per row; yields (changed [B, L],
    the lowest block any row decodes, step) after each step and returns the forward count."""
    B, L = x.shape
    K = cfg.block_length
    cache = KVCache.for_model(model, B, max_len=L, dtype=cache_dtype(model))
    block_of = torch.arange(L, device=x.device) // K  # [L]
    lo = torch.full((B,), P, device=x.device)  # each row's current block starts here
    step = 0
    while bool((active := lo < L).any()):
        at = lo.clamp(max=L - K)  # a row that is done re-feeds its last block
        back = P if step == 0 else K  # columns fed before the block: the prompt, then the previous block
        start = at - back
        cols = start[:, None] + torch.arange(back + K, device=x.device)  # [B, W]
        end = int(at.max()) + K
        bias = _window_bias(cols, block_of[:end], real[:, :end])
        want = torch.zeros(cols.shape, dtype=torch.bool, device=x.device)
        want[:, back:] = True  # the block's logits
        logits = model(
            x.gather(1, cols), attention_bias=bias, position_offset=start, kv_cache=cache, attend_len=end, logits_at=want
        ).view(B, K, -1)
        rows = active.nonzero().flatten()
        block_cols = (at[:, None] + torch.arange(K, device=x.device))[rows]  # [b, K]
        current = x[rows[:, None], block_cols]
        cand = current == mask_id
        gen = rows_of(generator, rows)
        chosen, conf = draw_block(logits[rows].float(), cfg, mask_id, gen)
        n = reveal_count(torch.zeros(len(rows), dtype=torch.long, device=x.device), conf, cand, cfg)
        reveal = reveal_mask(conf, cand, n, cfg, gen)
        x[rows[:, None], block_cols] = torch.where(reveal, chosen, current)
        changed = torch.zeros_like(x, dtype=torch.bool)
        changed[rows[:, None], block_cols] = reveal
        lo[rows] += K * (cand & ~reveal).any(1).logical_not()
        yield changed, int(block_of[at[rows].min()] - P // K), step
        step += 1
    return step


def _window_bias(cols: Tensor, block_of: Tensor, real: Tensor) -> Tensor:
    """Additive bias [B, 1, W, E] of window columns cols [B, W] over key slots [0, E): a query sees
    the real keys of its own and earlier blocks (block_of [E], real [B, E]), and itself."""
    keys = torch.arange(len(block_of), device=cols.device)
    seen = (block_of[None, None, :] <= block_of[cols][:, :, None]) & real[:, None, :].bool()
    seen |= cols[:, :, None] == keys
    bias = torch.zeros(seen.shape, device=cols.device).masked_fill(~seen, float("-inf"))
    return bias[:, None]
