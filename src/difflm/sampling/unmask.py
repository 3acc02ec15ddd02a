"""The one iterative-unmasking sampler, shared by every masked-diffusion denoiser.

`generate` appends `gen_length` mask tokens to a prompt and reveals them over `steps` forward
passes; `infill` does the same for any set of positions. Each step: one forward (conditional and
unconditional stacked into one batch under classifier-free guidance), draw a token at every
position of the current block, score the draws by a confidence policy, and reveal the best ones
(keep mode) or keep the best and re-mask the rest (resample mode). Blocks are filled left to right
(semi-autoregressive, as in LLaDA); steps are shared out over blocks in proportion to their size.

Prompts may be left or right padded: rows are converted to left padding (stable sort of the
attention mask), so the generation region is the same columns [P, P+G) for every row and the
returned tokens are left padded. The model only needs the denoiser protocol of
docs/architecture.md plus `model.mask_token_id`.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.models.block_attention import block_causal_bias
from difflm.models.layers import padding_bias
from difflm.sampling.cache import BlockForward
from difflm.sampling.draw import Generators, reveal_counts, rows_of
from difflm.sampling.ragged import ragged_start, ragged_steps
from difflm.sampling.reveal import draw_block, draw_packed, greedy, reveal_count, reveal_mask
from difflm.sampling.settings import SampleConfig
from difflm.sampling.trace import Trace


@dataclass
class SampleResult:
    """Output of a sampler. tokens are left padded, so tokens[:, P:] is every row's generation."""

    tokens: Tensor  # [B, P+G]
    trace: Trace | None
    forward_passes: int  # model calls (a guided step batches cond + uncond into one call)
    attention_mask: Tensor | None = None  # [B, P+G] 1 real token, 0 padding


@dataclass
class Step:
    """One denoising step, as `infill_steps` yields it. `tokens` is the engine's live state
    [B, L] (read it before advancing; clone to keep it); `changed` [B, L] marks the positions
    this step wrote (revealed, or re-masked in resample mode)."""

    tokens: Tensor
    changed: Tensor
    block: int
    step: int


def split_steps(sizes: list[int], steps: int) -> list[int]:
    """Share `steps` over blocks of `sizes` in proportion to size (largest remainder).

    Every block gets at least one step and at most one step per token; the result sums to steps.
    """
    total = sum(sizes)
    if not len(sizes) <= steps <= total:
        raise DifflmError(f"cannot spread {steps} steps over {len(sizes)} blocks holding {total} tokens")
    quota = [steps * s / total for s in sizes]
    alloc = [min(s, max(1, math.floor(q))) for s, q in zip(sizes, quota, strict=True)]
    while sum(alloc) > steps:
        j = max((k for k in range(len(sizes)) if alloc[k] > 1), key=lambda k: alloc[k] - quota[k])
        alloc[j] -= 1
    while sum(alloc) < steps:
        j = max((k for k in range(len(sizes)) if alloc[k] < sizes[k]), key=lambda k: quota[k] - alloc[k])
        alloc[j] += 1
    return alloc


def left_pad(ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to the right end (order kept): ids, mask [B, P] left padded."""
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    if attention_mask.shape != ids.shape:
        raise DifflmError(
            f"attention_mask shape {tuple(attention_mask.shape)} != ids shape {tuple(ids.shape)}"
        )
    order = attention_mask.long().argsort(dim=1, stable=True)  # padding (0) first, real order kept
    return ids.gather(1, order), attention_mask.long().gather(1, order)


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: cond + scale * (cond - uncond)."""
    return cond + scale * (cond - uncond)


def mask_token_of(model: Any) -> int:
    """model.mask_token_id, or a DifflmError saying how to set it."""
    mask_id = getattr(model, "mask_token_id", None)
    if mask_id is None:
        raise DifflmError(
            "the model has no mask_token_id; set it on the model (e.g. model.mask_token_id = tokenizer.mask_token_id)"
        )
    return int(mask_id)


def _batch_kwargs(cond: dict, uncond: dict, batch: int) -> dict | None:
    """kwargs for one forward over [cond; uncond] rows, or None when they cannot be stacked."""

    def batched(v: Any) -> bool:
        return isinstance(v, Tensor) and v.dim() > 0 and len(v) == batch

    out = {}
    for key in cond.keys() | uncond.keys():
        a, b = cond.get(key), uncond.get(key)
        if batched(a) and batched(b) and a.shape == b.shape:
            out[key] = torch.cat([a, b])
        elif a is b or not (isinstance(a, Tensor) or isinstance(b, Tensor)) and a == b:
            out[key] = a
        else:
            return None
    return out


def _pick_rows(value: Any, rows: Tensor | None, batch: int) -> Any:
    """value restricted to `rows` when it is a per-row tensor [batch, ...]; otherwise unchanged."""
    if rows is None or not isinstance(value, Tensor) or value.dim() == 0 or len(value) != batch:
        return value
    return value[rows]


class _Denoiser:
    """Calls the model (with guidance when cfg_scale > 0) under the cache policy; counts forwards."""

    def __init__(
        self, model, bias, prompt, cfg: SampleConfig, model_kwargs, uncond_kwargs, length: int
    ) -> None:
        self.bias, self.prompt, self.scale = bias, prompt, cfg.cfg_scale
        self.kwargs = model_kwargs or {}
        self.uncond_kwargs = uncond_kwargs
        self.mask_id = mask_token_of(model)
        self.forward = BlockForward(model, cfg.cache, length, block_causal=cfg.block_causal)
        self.calls = 0

    def new_block(self) -> None:
        self.forward.new_block()

    def _forward(self, x: Tensor, bias: Tensor | None, kwargs: dict, *where: Any) -> Tensor:
        self.calls += 1
        return self.forward(x, bias, kwargs, *where).float()  # [b, S, V] or [N, V]

    def __call__(
        self, x: Tensor, lo: int, hi: int, rows: Tensor | None = None, want: Tensor | None = None
    ) -> Tensor:
        """Logits [b, hi-lo, V] of the block's columns for the given rows of x [B, L] (None = all),
        or packed [N, V] at the true positions of `want` [b, hi-lo]."""
        B = len(x)
        if rows is not None and self.forward.feeds_block_only():  # cheaper than gathering the cache
            everywhere = None if want is None else _spread(want, rows, B)
            out = self(x, lo, hi, None, everywhere)
            return out if want is not None else out[rows]

        def sub(v: Any) -> Any:
            return _pick_rows(v, rows, B)

        xs, bias, kw = sub(x), sub(self.bias), {k: sub(v) for k, v in self.kwargs.items()}
        if self.scale == 0:
            return self._forward(xs, bias, kw, lo, hi, "cond", rows, B, want)
        if self.uncond_kwargs is None:  # masked LM: hide the prompt
            x_u, kw_u = xs.masked_fill(sub(self.prompt), self.mask_id), kw
        else:
            x_u, kw_u = xs, {**kw, **{k: sub(v) for k, v in self.uncond_kwargs.items()}}
        stacked = _batch_kwargs(kw, kw_u, len(xs))
        if stacked is None:
            cond = self._forward(xs, bias, kw, lo, hi, "cond", rows, B, want)
            uncond = self._forward(x_u, bias, kw_u, lo, hi, "uncond", rows, B, want)
        else:
            both = None if bias is None else torch.cat([bias, bias])
            rows2 = None if rows is None else torch.cat([rows, rows + B])
            x2, want2 = torch.cat([xs, x_u]), None if want is None else torch.cat([want, want])
            both_logits = self._forward(x2, both, stacked, lo, hi, "stacked", rows2, 2 * B, want2)
            cond, uncond = both_logits.chunk(2)  # rows (or packed positions) of cond come first
        return cfg_combine(cond, uncond, self.scale)


def _spread(want: Tensor, rows: Tensor, batch: int) -> Tensor:
    """want [b, S] of `rows` as [batch, S], False on the other rows."""
    full = torch.zeros(batch, want.shape[1], dtype=torch.bool, device=want.device)
    full[rows] = want
    return full


def _first_eos(x: Tensor, fill: Tensor, eos: int) -> Tensor:
    """Column of each row's first generated EOS [B] (L when none)."""
    is_eos = fill & (x == eos)
    return torch.where(is_eos.any(1), is_eos.long().argmax(1), x.shape[1])


def _fill_after_eos(x: Tensor, fill: Tensor, eos: int) -> Tensor:
    cols = torch.arange(x.shape[1], device=x.device)
    return x.masked_fill(fill & (cols > _first_eos(x, fill, eos)[:, None]), eos)


def _all_rows_ended(x: Tensor, fill: Tensor, eos: int, mask_id: int) -> bool:
    """True when every row has a generated EOS with no mask before it (eos_mode=stop)."""
    first = _first_eos(x, fill, eos)
    cols = torch.arange(x.shape[1], device=x.device)
    pending = (fill & (x == mask_id) & (cols < first[:, None])).any(1)
    return bool(((first < x.shape[1]) & ~pending).all())


def _reveal_targets(total: Tensor, n_steps: int, cfg: SampleConfig) -> Tensor:
    """Revealed-so-far target [B, n_steps] after each step of a block holding total [B] positions.

    steps = 0 (Fast-dLLM's rule) has no schedule: the target stays 0, so each step reveals the
    threshold / factor count (at least one) and the block runs until it is filled.
    """
    if cfg.steps == 0:
        return torch.zeros(len(total), n_steps, dtype=torch.long, device=total.device)
    counts = [
        torch.tensor(reveal_counts(int(n), n_steps, cfg.reveal_schedule)).cumsum(0).tolist() for n in total
    ]
    return torch.tensor(counts, device=total.device)


def _run_block(
    x: Tensor,
    in_block: Tensor,
    n_steps: int,
    block: int,
    denoise: _Denoiser,
    cfg: SampleConfig,
    fill: Tensor,
    generator: Generators,
    trace: Trace | None,
) -> Generator[Step, None, bool]:
    """Reveal one block in place over at most n_steps steps, yielding after each; returns False
    when eos_mode=stop ended early.

    A row whose block has no mask left waits, frozen, while the others finish theirs: each step
    runs the model, draws and ranks only on the rows still active, so they neither cost compute
    nor consume their generators (a row's sample does not depend on the rest of the batch).
    """
    mask_id, keep = denoise.mask_id, cfg.mode == "keep"
    cols = in_block.any(0).nonzero().flatten()
    lo, hi = int(cols.min()), int(cols.max()) + 1  # the block's column span
    win = in_block[:, lo:hi]  # [B, S]
    start_masked = (win & (x[:, lo:hi] == mask_id)).sum(1)  # [B]
    targets = _reveal_targets(start_masked if keep else win.sum(1), n_steps, cfg)  # [B, n_steps]
    denoise.new_block()
    for i in range(n_steps):
        if cfg.eos_mode == "stop" and _all_rows_ended(x, fill, cfg.eos_token_id, mask_id):
            return False
        active = (win & (x[:, lo:hi] == mask_id)).any(1)  # [B]
        n_active = int(active.sum())
        if n_active == 0:
            break
        # every row active (always at batch 1): a slice, so the reads below are views, not gathers
        subset = None if n_active == len(x) else active.nonzero().flatten()  # [b]
        rows = slice(None) if subset is None else subset
        gen = generator if subset is None else rows_of(generator, subset)
        current, w = x[rows, lo:hi], win[rows]  # [b, S]
        cand = w & (current == mask_id) if keep else w
        if keep and greedy(cfg):  # only masked positions are drawn: project just those
            chosen, conf = draw_packed(denoise(x, lo, hi, subset, cand), cand, current, cfg, mask_id)
        else:
            chosen, conf = draw_block(denoise(x, lo, hi, subset), cfg, mask_id, gen)  # [b, S] each
        n = targets[rows, i] - (start_masked[rows] - cand.sum(1)) if keep else targets[rows, i]
        n = reveal_count(n, conf, cand, cfg)
        reveal = reveal_mask(conf, cand, n, cfg, gen)
        before = x.clone()
        if keep:
            x[rows, lo:hi] = torch.where(reveal, chosen, current)
            if cfg.eos_mode == "fill":
                x.copy_(_fill_after_eos(x, fill, cfg.eos_token_id))
        else:
            x[rows, lo:hi] = torch.where(w, torch.where(reveal, chosen, mask_id), current)
        if trace is not None:
            full_conf = torch.zeros(x.shape, device=x.device)
            full_conf[rows, lo:hi] = conf
            trace.record(x, before, full_conf, block, i)
        yield Step(x, x != before, block, i)
    return True


def _drain(steps: Generator[Step, None, SampleResult]) -> SampleResult:
    """Run a step generator to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def infill(
    model: Any,
    ids: Tensor,
    fill_mask: Tensor,
    cfg: SampleConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: Generators = None,
    model_kwargs: dict | None = None,
    uncond_kwargs: dict | None = None,
    trace: bool = False,
    attention_bias: Tensor | None = None,
) -> SampleResult:
    """Generate the positions where fill_mask [B, L] is true; the rest is fixed context.

    Blocks are the fill positions in left-to-right order, block_length at a time (gen_length is
    not used: the count comes from fill_mask). Padding (attention_mask 0) is hidden from the model;
    `attention_bias` [B|1, 1, L, L] is added to that (e.g. the block-causal bias of BD3 decoding).
    """
    return _drain(
        infill_steps(
            model,
            ids,
            fill_mask,
            cfg,
            attention_mask=attention_mask,
            generator=generator,
            model_kwargs=model_kwargs,
            uncond_kwargs=uncond_kwargs,
            trace=trace,
            attention_bias=attention_bias,
        )
    )


@torch.no_grad()  # torch wraps a generator function: grad mode is restored at every yield
def infill_steps(
    model: Any,
    ids: Tensor,
    fill_mask: Tensor,
    cfg: SampleConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: Generators = None,
    model_kwargs: dict | None = None,
    uncond_kwargs: dict | None = None,
    trace: bool = False,
    attention_bias: Tensor | None = None,
) -> Generator[Step, None, SampleResult]:
    """`infill` one step at a time: yields a `Step` after every denoising step and returns the
    `SampleResult` (StopIteration.value). A caller may interleave several runs (a server) or draw
    each step as it happens; the work is done lazily, between yields."""
    return (
        yield from _infill(
            model,
            ids,
            fill_mask,
            cfg,
            attention_mask,
            generator,
            model_kwargs,
            uncond_kwargs,
            trace,
            attention_bias,
        )
    )


def _infill(
    model: Any,
    ids: Tensor,
    fill_mask: Tensor,
    cfg: SampleConfig,
    attention_mask: Tensor | None,
    generator: Generators,
    model_kwargs: dict | None,
    uncond_kwargs: dict | None,
    trace: bool,
    attention_bias: Tensor | None,
) -> Generator[Step, None, SampleResult]:
    mask_id = mask_token_of(model)
    if ids.dim() != 2 or fill_mask.shape != ids.shape:
        raise DifflmError(
            f"ids must be [B, L] and fill_mask the same shape; got {tuple(ids.shape)}, {tuple(fill_mask.shape)}"
        )
    real = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    fill = fill_mask.bool() & real.bool()
    n_max = int(fill.sum(1).max())
    if n_max == 0:
        raise DifflmError("fill_mask selects no real position; mark the positions to generate with True")
    sizes = cfg.block_sizes(n_max)
    # infill may hold fewer than gen_length; steps = 0: up to one step per position, until filled
    n_steps = sizes if cfg.steps == 0 else split_steps(sizes, min(cfg.steps, n_max))
    x = ids.masked_fill(fill, mask_id)
    bias = None if bool(real.all()) else padding_bias(real)
    if attention_bias is not None:
        bias = _self_visible(attention_bias if bias is None else attention_bias + bias)
    apart = ragged_start(model, cfg, fill, plain=not (trace or model_kwargs))
    if apart is not None:  # rows move on to their next block one by one (ragged.py)
        return (yield from _ragged(model, x, real, apart, cfg, mask_id, generator))
    denoise = _Denoiser(model, bias, ~fill & real.bool(), cfg, model_kwargs, uncond_kwargs, ids.shape[1])
    record = Trace(x.cpu().clone(), fill.cpu(), real.cpu(), mask_id) if trace else None
    block_of = torch.where(fill, (fill.long().cumsum(1) - 1) // sizes[0], -1)  # [B, L]
    for k, steps_k in enumerate(n_steps):
        if not (yield from _run_block(x, block_of == k, steps_k, k, denoise, cfg, fill, generator, record)):
            break
    if cfg.eos_mode != "none":
        x = _fill_after_eos(x, fill, cfg.eos_token_id)
    return SampleResult(x, record, denoise.calls, real)


def _ragged(
    model: Any, x: Tensor, real: Tensor, P: int, cfg: SampleConfig, mask_id: int, generator: Generators
) -> Generator[Step, None, SampleResult]:
    """`ragged_steps` as the engine's Steps and SampleResult."""
    run = ragged_steps(model, x, real, P, cfg, mask_id, generator)
    while True:
        try:
            changed, block, i = next(run)
        except StopIteration as done:
            return SampleResult(x, None, done.value, real)
        yield Step(x, changed, block, i)


def generate(
    model: Any,
    prompt_ids: Tensor,
    cfg: SampleConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: Generators = None,
    model_kwargs: dict | None = None,
    uncond_kwargs: dict | None = None,
    trace: bool = False,
    max_length: int | None = None,
) -> SampleResult:
    """Generate cfg.gen_length tokens after each prompt row [B, P]; returns tokens [B, P+G].

    `generator` may be one torch.Generator or one per row (then a row's sample does not depend
    on the rest of the batch). `max_length`: the model's context, checked against P + G.
    With cfg.block_causal the prompt is left padded to a multiple of block_length first (padding
    is hidden), so generated blocks sit where training put blocks; the padding is dropped again.
    """
    return _drain(
        generate_steps(
            model,
            prompt_ids,
            cfg,
            attention_mask=attention_mask,
            generator=generator,
            model_kwargs=model_kwargs,
            uncond_kwargs=uncond_kwargs,
            trace=trace,
            max_length=max_length,
        )
    )


def generate_steps(
    model: Any,
    prompt_ids: Tensor,
    cfg: SampleConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: Generators = None,
    model_kwargs: dict | None = None,
    uncond_kwargs: dict | None = None,
    trace: bool = False,
    max_length: int | None = None,
) -> Generator[Step, None, SampleResult]:
    """`generate` one step at a time (see `infill_steps`); the generation is columns [P, P+G)."""
    if prompt_ids.dim() != 2:
        raise DifflmError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}")
    B, P = prompt_ids.shape
    G = cfg.gen_length
    align = (-P) % cfg.block_length if cfg.block_causal else 0
    if max_length is not None and align + P + G > max_length:
        raise DifflmError(
            f"prompt of {P} tokens (+{align} alignment) + gen_length {G} exceeds the model's max length "
            f"{max_length}; shorten the prompt or lower sample.gen_length"
        )
    ids, real = left_pad(prompt_ids, attention_mask)
    ids = torch.cat([ids.new_zeros(B, align), ids], dim=1)  # [B, align + P]
    real = torch.cat([real.new_zeros(B, align), real], dim=1)
    P += align
    gen = torch.full((B, G), mask_token_of(model), dtype=ids.dtype, device=ids.device)
    fill = torch.zeros(B, P + G, dtype=torch.bool, device=ids.device)
    fill[:, P:] = True
    mask = torch.cat([real, torch.ones_like(gen)], dim=1)  # [B, P+G]
    bias = block_causal_bias(P + G, cfg.block_length, device=ids.device) if cfg.block_causal else None
    result = yield from infill_steps(
        model,
        torch.cat([ids, gen], dim=1),
        fill,
        cfg,
        attention_mask=mask,
        generator=generator,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        trace=trace,
        attention_bias=bias,
    )
    result.tokens, result.attention_mask = result.tokens[:, align:], result.attention_mask[:, align:]
    return result


def _self_visible(bias: Tensor) -> Tensor:
    """The bias with every query seeing at least its own key: a padding query whose keys are all
    hidden would give NaN states, and NaN values leak through zero attention weights."""
    L = bias.shape[-1]
    eye = torch.eye(L, dtype=torch.bool, device=bias.device)
    return bias.masked_fill(eye, 0.0) if bias.shape[-2] == L else bias
