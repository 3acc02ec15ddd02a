"""Token drawing and confidence scores: small pure functions shared by every sampler.

The diffusion engine (`unmask.py`) and the autoregressive baseline (`autoregressive.py`) both turn
logits into tokens with `draw_tokens`; the engine then ranks positions with `confidence` and
decides how many to reveal per step with `reveal_counts`.

Randomness is explicit. A `generator` may be one `torch.Generator` (noise for the whole batch in
one draw), a sequence of generators, one per batch row (row b's noise comes only from generator b,
so a row's sample does not depend on what else is in the batch), or None (global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.sampling.settings import MASK_SCHEDULES, REVEAL_SCHEDULES

Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> Tensor:
    """Float64 uniform noise in [0, 1) of `shape` (dim 0 = batch), on `device`."""
    if generator is None or isinstance(generator, torch.Generator):
        source = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, dtype=torch.float64, device=source).to(device)
    if len(generator) != shape[0]:
        raise DifflmError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per row")
    rows = [torch.rand(shape[1:], generator=g, dtype=torch.float64, device=g.device) for g in generator]
    return torch.stack(rows).to(device)


def rows_of(generator: Generators, rows: Tensor) -> Generators:
    """The generators of `rows` when there is one per row; a shared generator is kept."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[r] for r in rows.tolist()]


def apply_top_k(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits on the last axis, set the rest to -inf (None or 0 = no-op)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches p (None or 1 = no-op).

    The most likely token is always kept, so the result is never all -inf.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [..., V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_argmax(logits: Tensor, temperature: float, generator: Generators = None) -> Tensor:
    """Sample from softmax(logits / temperature) by the Gumbel-max trick; temperature 0 = argmax.

    The noise and the sum are float64 (as LLaDA does): in low precision the Gumbel tail is
    truncated and sampling at low temperature degrades. Returns indices [...] (last axis dropped).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = uniform(tuple(logits.shape), generator, logits.device)  # [..., V]
    gumbel = -torch.log(-torch.log(u))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def draw_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    tempered_probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """Draw one token per position: returns (chosen [...], probs [..., V]) for confidence scores.

    top-k / top-p act on the tempered distribution softmax(logits / T). `probs` is the model's
    distribution softmax(logits), or the tempered and filtered one when `tempered_probs`.
    """
    logits = logits.float()
    if temperature == 0 and not top_k and (top_p is None or top_p >= 1.0):  # plain argmax: no filter
        return logits.argmax(dim=-1), logits.softmax(dim=-1)
    tempered = logits / temperature if temperature > 0 else logits
    kept = apply_top_p(apply_top_k(tempered, top_k), top_p)  # [..., V]
    filtered = logits.masked_fill(kept.isneginf(), float("-inf"))
    chosen = gumbel_argmax(filtered, temperature, generator)
    probs = (kept if tempered_probs else logits).softmax(dim=-1)
    return chosen, probs


def greedy_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax tokens [...] and their probability [...] from logits [..., V] (the engine's greedy
    low-confidence path). Softmax then gather: on CPU `logsumexp` is up to 10x slower than
    `softmax` when many logits are very negative (a suppressed or shortlisted vocabulary), and
    with a large vocabulary the draw is a sizeable share of a cached step."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    return chosen, logits.softmax(dim=-1).gather(-1, chosen[..., None]).squeeze(-1)


def _probability(probs: Tensor, chosen: Tensor) -> Tensor:
    return probs.gather(-1, chosen[..., None]).squeeze(-1)


def _margin(probs: Tensor, chosen: Tensor) -> Tensor:
    top2 = probs.topk(2, dim=-1).values  # [..., 2]
    return top2[..., 0] - top2[..., 1]


def _neg_entropy(probs: Tensor, chosen: Tensor) -> Tensor:
    return (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


CONFIDENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "low_confidence": _probability,
    "margin": _margin,
    "entropy": _neg_entropy,
}


def confidence(probs: Tensor, chosen: Tensor, kind: str) -> Tensor:
    """Confidence [...] of each drawn token (higher = more sure) from probs [..., V].

    low_confidence: p(chosen); margin: top1 - top2 probability; entropy: negative entropy.
    The random policies rank by noise instead and are handled by the engine.
    """
    if kind not in CONFIDENCES:
        raise DifflmError(f"unknown confidence kind {kind!r}; choose one of {sorted(CONFIDENCES)}")
    return CONFIDENCES[kind](probs, chosen)


def reveal_counts(n_masked: int, steps: int, schedule: str = "even") -> list[int]:
    """How many of `n_masked` positions to reveal at each of `steps` steps; sums to n_masked.

    even (LLaDA): n // steps per step, the remainder to the earliest steps.
    linear / cosine (MaskGIT): the count still masked after step s is floor(n * gamma(s / steps)),
    clamped so every step reveals at least one token while any remain.
    """
    if schedule not in REVEAL_SCHEDULES:
        raise DifflmError(f"unknown reveal schedule {schedule!r}; choose one of {list(REVEAL_SCHEDULES)}")
    if steps < 1:
        raise DifflmError(f"steps must be >= 1, got {steps}")
    if n_masked <= steps:
        return [1] * n_masked + [0] * (steps - n_masked)
    if schedule == "even":
        base, extra = divmod(n_masked, steps)
        return [base + (s < extra) for s in range(steps)]
    gamma = MASK_SCHEDULES[schedule]
    counts, still_masked = [], n_masked
    for s in range(1, steps + 1):
        after = math.floor(n_masked * gamma(s / steps))
        after = max(steps - s, min(after, still_masked - 1))  # leave >= 1 for each later step
        counts.append(still_masked - after)
        still_masked = after
    return counts


def threshold_count(conf: Tensor, cand: Tensor, threshold: float, *, prefix: bool = False) -> Tensor:
    """Per row [B], how many candidates (cand [B, S]) have confidence conf [B, S] >= threshold;
    with `prefix`, only the leading run of such candidates in position order counts (left-to-right
    decoding reveals its leftmost masks, so each one revealed must itself be confident)."""
    sure = cand & (conf >= threshold)
    if not prefix:
        return sure.sum(1)
    run = (sure | ~cand).cumprod(1)  # [B, S] 1 up to the first unsure candidate (others do not break it)
    return (sure & run.bool()).sum(1)


def factor_count(conf: Tensor, cand: Tensor, factor: float) -> Tensor:
    """Per row [B], the largest n with (n + 1) * (1 - c_n) < factor, c_n the n-th highest confidence.

    Fast-dLLM's factor rule: the more tokens revealed at once, the more sure each must be. With
    confidences sorted high to low the left side only grows with n, so n is the length of the
    leading run that satisfies it (0 when even the best candidate fails; the engine adds the
    one-per-step floor).
    """
    ranked = conf.double().masked_fill(~cand, float("-inf")).sort(dim=1, descending=True).values  # [B, S]
    n = torch.arange(1, conf.shape[1] + 1, device=conf.device, dtype=torch.float64)  # [S]
    ok = torch.isfinite(ranked) & ((n + 1) * (1 - ranked) < factor)  # [B, S]
    return ok.long().cumprod(dim=1).sum(1)
