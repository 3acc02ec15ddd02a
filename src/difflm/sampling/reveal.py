"""One step's choice inside a block: draw a token at each position from its logits and pick the
positions to reveal under a `SampleConfig` (remasking policy, threshold / factor counts). Shared by
the block-by-block engine (`unmask.py`) and the engine for rows at different blocks (`ragged.py`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.sampling.draw import (
    CONFIDENCES,
    Generators,
    confidence,
    draw_tokens,
    factor_count,
    greedy_confidence,
    threshold_count,
    uniform,
)
from difflm.sampling.settings import SampleConfig


def top_n(scores: Tensor, cand: Tensor, n: Tensor) -> Tensor:
    """Bool [B, S]: per row the n[b] highest-scoring candidates (ties: leftmost first)."""
    scores = scores.double().masked_fill(~cand, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)  # [B, S]
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return cand & (ranks < n[:, None])


def reveal_mask(conf: Tensor, cand: Tensor, n: Tensor, cfg: SampleConfig, generator: Generators) -> Tensor:
    """Bool [B, S]: the n[b] candidates of each row the remasking policy reveals now."""
    if cfg.remasking == "left_to_right":  # the leftmost n: no ranking needed
        return cand & (cand.cumsum(1) <= n[:, None])
    return top_n(rank_scores(conf, cand, n, cfg, generator), cand, n)


def rank_scores(conf: Tensor, cand: Tensor, n: Tensor, cfg: SampleConfig, generator: Generators) -> Tensor:
    """Ranking score [B, S] of each candidate under a ranking remasking policy (higher = reveal first)."""
    if cfg.remasking == "random":
        return uniform(tuple(conf.shape), generator, conf.device)
    if cfg.remasking == "random_topk":
        pool = top_n(conf, cand, torch.clamp(n, min=cfg.topk_pool))
        noise = uniform(tuple(conf.shape), generator, conf.device)
        return noise.masked_fill(~pool, float("-inf"))
    return conf.double()


def draw_block(
    logits: Tensor, cfg: SampleConfig, mask_id: int, generator: Generators
) -> tuple[Tensor, Tensor]:
    """Tokens [B, S] and their confidence [B, S] from logits [B, S, V]."""
    banned = [mask_id, *cfg.suppress_tokens]
    if max(banned) >= logits.shape[-1]:
        raise DifflmError(
            f"suppress_tokens / mask id {max(banned)} outside the vocabulary of {logits.shape[-1]}"
        )
    logits = logits.index_fill(-1, _index(tuple(banned), logits.device), float("-inf"))
    if greedy(cfg):
        return greedy_confidence(logits)
    chosen, probs = draw_tokens(
        logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, cfg.confidence_from_tempered
    )
    kind = cfg.remasking if cfg.remasking in CONFIDENCES else "low_confidence"
    return chosen, confidence(probs, chosen, kind)


@functools.lru_cache(maxsize=32)
def _index(ids: tuple[int, ...], device: torch.device) -> Tensor:
    """ids as an index tensor, made once per run's banned list rather than at every step."""
    return torch.tensor(ids, device=device)


def greedy(cfg: SampleConfig) -> bool:
    """Argmax drawing ranked by the drawn token's probability: no noise, no filter."""
    plain = not cfg.top_k and (cfg.top_p is None or cfg.top_p >= 1.0)
    return cfg.temperature == 0 and plain and cfg.remasking not in ("margin", "entropy")


def draw_packed(
    logits: Tensor, cand: Tensor, current: Tensor, cfg: SampleConfig, mask_id: int
) -> tuple[Tensor, Tensor]:
    """Greedy draw from packed logits [N, V] of the candidates cand [b, S]: tokens [b, S] (the
    current token elsewhere) and confidence [b, S] (0 elsewhere)."""
    chosen_n, conf_n = draw_block(logits[None], cfg, mask_id, None)  # [1, N] each
    chosen = current.masked_scatter(cand, chosen_n[0])
    conf = torch.zeros(cand.shape, device=cand.device).masked_scatter(cand, conf_n[0].float())
    return chosen, conf


def reveal_count(n: Tensor, conf: Tensor, cand: Tensor, cfg: SampleConfig) -> Tensor:
    """Positions to reveal per row [b]: the schedule's n, raised by threshold / factor, >= 1."""
    if cfg.threshold is not None:
        prefix = cfg.remasking == "left_to_right"
        n = torch.maximum(n, threshold_count(conf, cand, cfg.threshold, prefix=prefix))
    if cfg.factor is not None:
        n = torch.maximum(n, factor_count(conf, cand, cfg.factor))
    return n.clamp(min=1).minimum(cand.sum(1))  # >= 1 per step while candidates are left
