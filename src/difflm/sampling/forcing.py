"""Diffusion Forcing sampling: scheduling matrices and the chunked, sliding-window sampler.

A scheduling matrix is a LongTensor [rows, horizon] of sampler indices in [0, S]
(S = sampling_timesteps; index i is the real level `diffusion.level_grid[i]`, so 0 = clean,
S = pure noise).  Row 0 is all S, the last row all 0, and each column never goes up: row m -> m+1
is one denoising step of every token whose index changes.

`sample_forcing` generates `max_new_tokens` after a prompt, `horizon` tokens per chunk, walking one
matrix per chunk.  The model sees at most `block_size` positions (a sliding window); clean tokens
in the window (the prompt, earlier chunks, tokens of this chunk already finished) are context:
fed as their clean embedding scaled to the mean of level `stabilization_level - 1`,
`sqrt(alpha_bar) x0`, with that level id (as the reference sampler does), and never changed.
Finished chunks are snapped to the nearest clean embedding, so context is always made of exact
token embeddings.  The caller puts the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difflm.diffusion.gaussian import GaussianDiffusion
from difflm.errors import DifflmError
from difflm.models.dfgpt import DFGPT
from difflm.sampling.trace import Trace

GuidanceFn = Callable[[Tensor], Tensor]  # x0_hat [B, W, D] -> scalar to increase (e.g. a log-likelihood)

NOT_YET = -1  # trace id of positions not generated yet (the trace's "mask token")


# ----------------------------------------------------------------------------- scheduling matrices


def _check(horizon: int, S: int, uncertainty_scale: float = 0.0) -> None:
    if horizon < 1:
        raise DifflmError(f"horizon must be >= 1, got {horizon}")
    if S < 1:
        raise DifflmError(f"sampling_timesteps must be >= 1, got {S}")
    if uncertainty_scale < 0:
        raise DifflmError(f"uncertainty_scale must be >= 0, got {uncertainty_scale}")


def _staircase(offsets: list[int], S: int) -> Tensor:
    """M[m, t] = clip(S + offsets[t] - m, 0, S), with just enough rows for every column to reach 0."""
    height = S + max(offsets) + 1
    rows = torch.arange(height)[:, None]  # [rows, 1]
    return (S + torch.tensor(offsets)[None, :] - rows).clamp(0, S)  # [rows, horizon]


def pyramid(horizon: int, S: int, uncertainty_scale: float = 1.0) -> Tensor:
    """Later tokens lag behind earlier ones by int(t * uncertainty_scale) steps."""
    _check(horizon, S, uncertainty_scale)
    return _staircase([int(t * uncertainty_scale) for t in range(horizon)], S)


def full_sequence(horizon: int, S: int) -> Tensor:
    """All tokens denoised together: rows S, S-1, ..., 0."""
    _check(horizon, S)
    return _staircase([0] * horizon, S)


def autoregressive(horizon: int, S: int) -> Tensor:
    """One token at a time: token t starts only when token t-1 is clean (a pyramid with lag S)."""
    return pyramid(horizon, S, float(S))


def trapezoid(horizon: int, S: int, uncertainty_scale: float = 1.0) -> Tensor:
    """Both ends first, the middle last: the lag of token t is int(min(t, horizon-1-t) * uncertainty_scale).

    Symmetric (lags [0, 1, 2, 1, 0] for horizon 5) and every column runs from S to 0: the matrix
    the reference's mirrored indexing aims at, and the default here.  The reference code does not
    build it; `trapezoid_reference` builds what it does build.
    """
    _check(horizon, S, uncertainty_scale)
    return _staircase([int(min(t, horizon - 1 - t) * uncertainty_scale) for t in range(horizon)], S)


def trapezoid_reference(horizon: int, S: int, uncertainty_scale: float = 1.0) -> Tensor:
    """The reference code's trapezoid, exactly, for reproducing published runs.

    It writes lag int(t * uncertainty_scale) to columns t and -t for t < ceil(horizon / 2); column -t
    is horizon - t (and -0 is column 0 again), so the lags are shifted by one on the right half:
    [0, 1, 2, 2, 1] for horizon 5.  For even horizon, column horizon / 2 is never written and stays
    at index 0 (fed as clean context although it holds pure noise).  It has S + int(ceil(horizon / 2)
    * uncertainty_scale) rows, so with a fractional uncertainty_scale a column can end above 0.
    """
    _check(horizon, S, uncertainty_scale)
    half = (horizon + 1) // 2
    height = S + int(half * uncertainty_scale)
    lags = torch.full((horizon,), -S)  # unwritten columns: clip(S - S - m) = 0 on every row
    for t in range(half):
        lags[t] = lags[(horizon - t) % horizon] = int(t * uncertainty_scale)
    rows = torch.arange(height)[:, None]  # [rows, 1]
    return (S + lags[None, :] - rows).clamp(0, S)  # [rows, horizon]


SCHEDULES: dict[str, Callable[[int, int, float], Tensor]] = {
    "pyramid": pyramid,
    "full_sequence": lambda horizon, S, _scale: full_sequence(horizon, S),
    "autoregressive": lambda horizon, S, _scale: autoregressive(horizon, S),
    "trapezoid": trapezoid,
    "trapezoid_reference": trapezoid_reference,
}


def scheduling_matrix(name: str, horizon: int, S: int, uncertainty_scale: float = 1.0) -> Tensor:
    if name not in SCHEDULES:
        raise DifflmError(f"unknown scheduling matrix {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name](horizon, S, uncertainty_scale)


# ----------------------------------------------------------------------------- one step


def _guided_prediction(
    model: DFGPT,
    diffusion: GaussianDiffusion,
    x_in: Tensor,
    k_in: Tensor,
    guidance_fn: GuidanceFn,
    scale: float,
    k_next: Tensor,
) -> tuple[Tensor, Tensor]:
    """Classifier-style guidance: eps <- eps - scale * sqrt(1 - a_next) * d guidance_fn(x0_hat) / d x_t.

    a_next is alpha_bar at the level each token steps to (k_next [B, W]), as in the reference's
    ddim_sample_step; a token stepping to clean (k_next = -1) gets no guidance.
    """
    with torch.enable_grad():
        x_req = x_in.detach().requires_grad_(True)
        x0, eps = diffusion.split_prediction(model(x_req, k_in), x_req, k_in)  # [B, W, D] each
        (grad,) = torch.autograd.grad(guidance_fn(x0).sum(), x_req)  # [B, W, D]
    eps = eps.detach() - scale * (1 - diffusion.alpha_bar(k_next))[..., None].sqrt() * grad
    return diffusion.x0_from_eps(x_in, k_in, eps), eps


def _denoise_step(
    model: DFGPT,
    diffusion: GaussianDiffusion,
    x: Tensor,
    k_from: Tensor,
    k_to: Tensor,
    generator: torch.Generator,
    guidance_fn: GuidanceFn | None,
    guidance_scale: float,
) -> tuple[Tensor, Tensor]:
    """Window x [B, W, D] at real levels k_from [B, W] -> (x at k_to, x0_hat)."""
    context = k_from < 0  # [B, W] clean tokens
    k_in = torch.where(context, diffusion.context_level, k_from)  # [B, W]
    stabilised = diffusion.q_sample(x, k_in, torch.zeros_like(x))  # sqrt(alpha_bar) x0
    x_in = torch.where(context[..., None], stabilised, x)  # [B, W, D]
    if guidance_fn is None:
        x0, eps = diffusion.split_prediction(model(x_in, k_in), x_in, k_in)
    else:
        x0, eps = _guided_prediction(model, diffusion, x_in, k_in, guidance_fn, guidance_scale, k_to)
    x_next = diffusion.ddim_update(x, x0, eps, k_from, k_to, diffusion.sampling_eta, generator)
    return x_next, x0


# ----------------------------------------------------------------------------- the sampler


@torch.no_grad()
def sample_forcing(
    model: DFGPT,
    diffusion: GaussianDiffusion,
    prompt_ids: Tensor,
    *,
    max_new_tokens: int,
    horizon: int,
    schedule: str = "pyramid",
    generator: torch.Generator,
    uncertainty_scale: float = 1.0,
    guidance_fn: GuidanceFn | None = None,
    guidance_scale: float = 1.0,
    trace: bool = False,
) -> tuple[Tensor, Trace | None]:
    """Generate after prompt_ids [B, P]; returns (ids [B, P + max_new_tokens], Trace or None).

    The trace records, after every denoising step, the finished tokens plus the nearest-embedding
    decoding of the model's x0 prediction for the current chunk (`NOT_YET` = -1 beyond it), with
    the rounding softmax's top probability as confidence; `block` is the chunk, `step` the row.
    """
    block_size = model.max_length
    if not 1 <= horizon <= block_size:
        raise DifflmError(f"horizon must be in [1, block_size={block_size}], got {horizon}")
    if max_new_tokens < 0:
        raise DifflmError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if schedule not in SCHEDULES:
        raise DifflmError(f"unknown scheduling matrix {schedule!r}; choose from {', '.join(SCHEDULES)}")
    B, P = prompt_ids.shape
    end, device = P + max_new_tokens, prompt_ids.device
    tokens = torch.full((B, end), NOT_YET, dtype=torch.long, device=device)
    tokens[:, :P] = prompt_ids
    rec = _new_trace(tokens, P) if trace else None
    xs = model.embed_clean(prompt_ids)  # [B, P, D]
    cur, chunk_index = P, 0
    while cur < end:
        h = min(horizon, end - cur)
        matrix = scheduling_matrix(schedule, h, diffusion.config.sampling_timesteps, uncertainty_scale)
        noise = diffusion.randn((B, h, xs.shape[-1]), generator, device)  # [B, h, D]
        xs = torch.cat([xs, noise], dim=1)  # [B, cur + h, D]
        start = max(0, cur + h - block_size)  # sliding window: at most block_size positions
        n_ctx = cur - start
        for m in range(matrix.shape[0] - 1):
            k_from = _real_levels(diffusion, matrix[m], n_ctx, B)  # [B, W]
            k_to = _real_levels(diffusion, matrix[m + 1], n_ctx, B)
            window, x0 = _denoise_step(
                model, diffusion, xs[:, start:], k_from, k_to, generator, guidance_fn, guidance_scale
            )
            xs[:, start:] = window
            if rec is not None:
                _record(rec, model, tokens, x0[:, n_ctx:], cur, chunk_index, m)
        new = model.decode_nearest(xs[:, cur:])  # [B, h]
        xs[:, cur:] = model.embed_clean(new)  # snap: context is exact token embeddings
        tokens[:, cur : cur + h] = new
        cur, chunk_index = cur + h, chunk_index + 1
    return tokens, rec


def _real_levels(diffusion: GaussianDiffusion, row: Tensor, n_context: int, batch: int) -> Tensor:
    """Sampler indices of one matrix row, prefixed by n_context clean tokens -> real levels [B, W]."""
    idx = torch.cat([torch.zeros(n_context, dtype=torch.long), row]).to(diffusion.level_grid.device)
    return diffusion.level_grid[idx][None].expand(batch, -1)


def _new_trace(tokens: Tensor, prompt_len: int) -> Trace:
    fill = torch.zeros(tokens.shape, dtype=torch.bool)
    fill[:, prompt_len:] = True
    return Trace(tokens.cpu().clone(), fill, torch.ones(tokens.shape, dtype=torch.long), NOT_YET)


def _record(
    rec: Trace, model: DFGPT, tokens: Tensor, x0_chunk: Tensor, cur: int, block: int, step: int
) -> None:
    """Append the finished tokens + decoded x0 prediction of the chunk at positions cur.. ."""
    before = rec.steps[-1].tokens if rec.steps else rec.initial
    snapshot = tokens.clone()
    snapshot[:, cur : cur + x0_chunk.shape[1]] = model.decode_nearest(x0_chunk)
    confidence = torch.zeros(tokens.shape, device=tokens.device)
    probs = model.round_logits(x0_chunk).float().softmax(-1).amax(-1)  # [B, h]
    confidence[:, cur : cur + x0_chunk.shape[1]] = probs
    rec.record(snapshot.cpu(), before, confidence.cpu(), block, step)
