"""Likelihood metrics on a validation split: the masked-diffusion ELBO bound and the AR loss.

The ELBO bound: for each sequence and Monte-Carlo draw of t, mask at rate p(t) and score
w(t) * sum of CE on masked tokens / L. Its mean is an upper bound on the NLL per token
(LLaDA / MDLM), so exp of it bounds the perplexity from above. The CE uses MDLM's SUBS
parameterisation (the mask token's logit is -inf, as the sampler bans it): the bound of the model
the sampler draws from, and tighter than the plain softmax's (see diffusion/losses.py). Draws use
a fixed seed: the same checkpoint always gets the same number.

`left_to_right_nll` is not a bound: the exact NLL of the masked model decoded one token a step,
leftmost mask first inside each block, which is a proper distribution (the sampler's at
`--remasking left_to_right`, steps = tokens, temperature 1).

`any_order_nll` is not a bound either: the exact NLL of block diffusion's own generative model,
each block revealed one token at a time in a uniformly random order (the likelihood the ELBO
bounds), summed over the K! orders of a block of K.

`continuation_elbo` scores one continuation given its context (lm-eval's loglikelihood requests)
with the lower-variance estimator of LLaDA's evaluation code, described at the function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from difflm.config import DiffusionConfig
from difflm.errors import DifflmError
from difflm.models.layers import padding_bias
from difflm.models.protocol import check_denoiser
from difflm.sampling.unmask import mask_token_of
from difflm.train.objectives import AutoregressiveObjective, MaskedDiffusionObjective
from difflm.train.trainer import collate, step_generator, to_device


@torch.no_grad()
def mean_objective_loss(
    model,
    objective,
    data,
    *,
    batch_size: int,
    samples: int,
    seed: int,
    max_batches: int | None = None,
    progress: bool = True,
) -> float:
    device = next(model.parameters()).device
    model.eval()
    n_batches = math.ceil(len(data) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    total, count = 0.0, 0
    # one tick per forward: each batch is scored at `samples` noise draws
    bar = tqdm(total=n_batches * samples, desc="eval", unit="forward", disable=not progress, dynamic_ncols=True)
    for b in range(n_batches):
        batch = collate([data[i] for i in range(b * batch_size, min(len(data), (b + 1) * batch_size))])
        for s in range(samples):
            prepared = objective.prepare(batch, step_generator(seed, b * samples + s, salt=2))
            loss, _ = objective.loss(model, to_device(prepared, device))
            rows = batch["input_ids"].shape[0]
            total += loss.item() * rows
            count += rows
            bar.update(1)
    bar.close()
    return total / count


def elbo_nll(
    model,
    data,
    *,
    schedule: str = "linear",
    mask_token_id: int,
    vocab_size: int,
    batch_size: int = 32,
    samples: int = 4,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = True,
    block_length: int | None = None,
) -> float:
    """NELBO per token (nats) with plain masking (no min rate, no spans, t over all of [eps, 1]),
    so it is a true bound, with MDLM's SUBS parameterisation (the mask token never predicted);
    `block_length` K gives block diffusion's bound (each block given the clean earlier ones; K = 1
    is a next-token likelihood, K = None full-sequence masked diffusion)."""
    objective = MaskedDiffusionObjective(
        DiffusionConfig(schedule=schedule, loss="mdlm", block_length=block_length),
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
    )
    return mean_objective_loss(
        model,
        objective,
        data,
        batch_size=batch_size,
        samples=samples,
        seed=seed,
        max_batches=max_batches,
        progress=progress,
    )


def exact_loss(model, objective, data, batch_size: int, max_batches: int | None, progress: bool) -> float:
    """`mean_objective_loss` of an objective that draws nothing (one pass, no seed to vary)."""
    return mean_objective_loss(
        model, objective, data, batch_size=batch_size, samples=1, seed=0, max_batches=max_batches, progress=progress
    )


def left_to_right_nll(
    model,
    data,
    *,
    mask_token_id: int,
    vocab_size: int,
    block_length: int | None = None,
    batch_size: int = 32,
    max_batches: int | None = None,
    progress: bool = True,
) -> float:
    """Exact NLL per token (nats) of decoding one token a step, left to right inside each block of
    `block_length` K (None: one block, the whole sequence), each block given the clean earlier ones.
    No Monte Carlo: K forwards per batch (see `LeftToRightObjective`)."""
    objective = LeftToRightObjective(
        DiffusionConfig(loss="mdlm", block_length=block_length),
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
    )
    return exact_loss(model, objective, data, batch_size, max_batches, progress)


class LeftToRightObjective(MaskedDiffusionObjective):
    """The masked-diffusion loss under the fixed left-to-right reveal order instead of drawn masks.

    Pass j (j = 0..K-1) masks every block from its offset j on and scores the tokens at offset j
    with weight 1, so the passes together score every token once, under the mask pattern the
    sampler sees when it reveals that token. SUBS log-probs, as `elbo_nll`.
    """

    def prepare(self, batch, generator: torch.Generator):
        return batch  # nothing is drawn

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        ids = batch["input_ids"]  # [B, L]
        offset = torch.arange(ids.shape[1], device=ids.device) % (
            self.cfg.block_length or ids.shape[1]
        )  # [L]
        total = torch.zeros((), device=ids.device)
        for j in range(int(offset.max()) + 1):
            scored = (offset == j).expand_as(ids)
            if "attention_mask" in batch:
                scored = scored & batch["attention_mask"].bool()
            prepared = {
                **batch,
                "noisy": ids.masked_fill(offset >= j, self.mask_token_id),
                "noised": scored,
                "inv_weight": torch.ones(ids.shape[0], device=ids.device),
            }
            total = total + super().loss(model, prepared)[0]  # CE at offset j summed / (B * L)
        return total, {}


MAX_ANY_ORDER_BLOCK = 8  # 2^K forwards per batch


def any_order_nll(
    model,
    data,
    *,
    mask_token_id: int,
    vocab_size: int,
    block_length: int | None,
    batch_size: int = 32,
    max_batches: int | None = None,
    progress: bool = True,
) -> float:
    """Exact NLL per token (nats) of block diffusion decoded one token a step in a uniformly random
    order inside each block of `block_length` K, each block given the clean earlier ones: the
    generative model of the continuous-time reverse process (every masked token is revealed at
    the same rate, so one at a time in a uniformly random order), whose NLL the ELBO bounds, and
    the sampler's at `--remasking random`, steps = tokens, temperature 1. By Jensen it is at most
    the bound: log of the mean over orders of p(x | order) >= the mean of the logs. No Monte
    Carlo: 2^K forwards per batch (see `AnyOrderObjective`), so K <= MAX_ANY_ORDER_BLOCK."""
    check_any_order_block(block_length)
    objective = AnyOrderObjective(
        DiffusionConfig(loss="mdlm", block_length=block_length),
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
    )
    return exact_loss(model, objective, data, batch_size, max_batches, progress)


def check_any_order_block(block_length: int | None) -> None:
    """Raise DifflmError unless `any_order_nll` can take blocks of this length."""
    if block_length is None or not 1 <= block_length <= MAX_ANY_ORDER_BLOCK:
        raise DifflmError(
            f"the any-order NLL needs blocks of 1..{MAX_ANY_ORDER_BLOCK} tokens (it sums over the 2^K reveal "
            f"states of a block), got block length {block_length}; give a block length K <= "
            f"{MAX_ANY_ORDER_BLOCK} or use the ELBO bound"
        )


class AnyOrderObjective(MaskedDiffusionObjective):
    """-log of the mean over reveal orders of p(block | order), per block, summed / (B * L).

    Pass S (S = 0..2^K - 1, a set of offsets) reveals the offsets in S of every block, masks the
    rest and reads log p(x_i | x_S) at each masked offset i. Then per block, over sets of growing
    size, f(S) = logsumexp over i in S of f(S - i) + log p(x_i | x_(S - i)) sums the probability
    of revealing S in every order, and the block's probability is exp(f(all)) / K!. A position past
    the end, or padding, is revealed at no cost (log p = 0), which leaves the mean over the orders
    of the real tokens. SUBS log-probs, as `elbo_nll`.
    """

    def prepare(self, batch, generator: torch.Generator):
        return batch  # nothing is drawn

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        ids = batch["input_ids"]  # [B, L]
        (B, L), K = ids.shape, self.cfg.block_length
        n_blocks = math.ceil(L / K)
        offset = torch.arange(L, device=ids.device) % K  # [L]
        real = batch["attention_mask"].bool() if "attention_mask" in batch else ids.new_ones(ids.shape).bool()
        log_p = []  # per set S: [B, n_blocks, K]
        for S in range(2**K):
            hidden = ((S >> offset) & 1 == 0).expand(B, L)  # [B, L] the offsets not in S
            scored = self._token_log_probs(model, batch, hidden).masked_fill(~(hidden & real), 0.0)
            log_p.append(F.pad(scored, (0, n_blocks * K - L)).view(B, n_blocks, K))
        f = [torch.zeros(B, n_blocks, device=ids.device)] + [None] * (2**K - 1)
        for S in sorted(range(1, 2**K), key=lambda s: s.bit_count()):  # smaller sets first
            terms = [f[S ^ 1 << i] + log_p[S ^ 1 << i][..., i] for i in range(K) if S >> i & 1]
            f[S] = torch.logsumexp(torch.stack(terms), dim=0)
        nll = math.lgamma(K + 1) - f[-1]  # [B, n_blocks]
        return nll.sum() / (B * L), {}

    def _token_log_probs(self, model, batch, hidden: Tensor) -> Tensor:
        """log p [B, L] of each clean token with `hidden` [B, L] masked (SUBS), as the loss reads it."""
        ids = batch["input_ids"]
        bias = padding_bias(batch["attention_mask"]) if "attention_mask" in batch else None
        noisy = ids.masked_fill(hidden, self.mask_token_id)
        logits = self._block_forward(model, noisy, ids, bias, hidden, {}).float()  # [B, L, V]
        logits = logits.index_fill(-1, torch.tensor([self.mask_token_id], device=ids.device), float("-inf"))
        return logits.log_softmax(dim=-1).gather(-1, ids[..., None])[..., 0]


def ar_nll(
    model, data, *, batch_size: int = 32, max_batches: int | None = None, progress: bool = True
) -> float:
    """Next-token CE per predicted token (nats)."""
    return exact_loss(model, AutoregressiveObjective(), data, batch_size, max_batches, progress)


@torch.no_grad()
def continuation_elbo(
    model, context: Tensor, continuation: Tensor, *, samples: int, batch_size: int, generator: torch.Generator
) -> tuple[float, bool]:
    """(ELBO of log p(continuation | context), is_greedy) by Monte Carlo over `samples` draws.

    LLaDA's paper writes the bound with t ~ U(0, 1), each continuation token masked with
    probability t and the masked tokens' log-probs weighted by 1/t. Its evaluation code uses the
    lower-variance form used here: draw the NUMBER of masked tokens l uniformly in 1..L (L the
    continuation's length), mask a uniformly random l-subset, and weight the masked tokens'
    log-probs by L/l. Both have the same expectation, a lower bound on log p; with L = 1 every draw
    masks the one token with weight 1, so the value is exactly log p(token | context). Log-probs
    use SUBS (the mask token's logit is -inf, as the sampler draws), like `elbo_nll`.

    is_greedy: one extra forward with the whole continuation masked; True when the argmax at every
    continuation position equals the continuation, i.e. one-step greedy decoding would produce it
    (cheap; exact for one token, a stand-in for multi-step decoding otherwise).
    context [P], continuation [L] (L >= 1) are token ids on the model's device; all draws come
    from `generator` (a CPU generator), so a seed fixes the result.
    """
    P, L = len(context), len(continuation)
    counts = torch.randint(1, L + 1, (samples, 1), generator=generator)  # l per draw
    ranks = torch.rand(samples, L, generator=generator).argsort(dim=1)  # a random permutation per draw
    hidden = torch.cat([torch.ones(1, L, dtype=torch.bool), ranks < counts])  # row 0: all masked (greedy)
    hidden = F.pad(hidden, (P, 0)).to(context.device)  # [1 + samples, P + L], the context never masked
    clean = torch.cat([context, continuation]).expand_as(hidden)
    scores, greedy = [], True
    for rows in torch.arange(len(hidden)).split(batch_size):
        logp, argmax = _masked_log_probs(model, clean[rows], hidden[rows])  # [n, P + L] each
        scores.append(logp.sum(dim=1))
        if rows[0] == 0:
            greedy = bool((argmax[0, P:] == continuation).all())
    weights = (L / counts[:, 0]).to(context.device)  # [samples]
    return float((torch.cat(scores)[1:] * weights).mean()), greedy


def _masked_log_probs(model, clean: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """log p of the clean token [n, T] at the hidden positions (0 elsewhere) and the argmax [n, T]
    there, from one forward on `clean` with `hidden` replaced by the mask (SUBS log-probs); only
    hidden positions go through the vocabulary projection when the model supports `logits_at`."""
    mask_id = mask_token_of(check_denoiser(model))
    noisy = clean.masked_fill(hidden, mask_id)
    logits = model(noisy, logits_at=hidden) if model.supports_logits_at else model(noisy)[hidden]  # [N, V]
    logits = logits.float().index_fill(1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    logp = logits.log_softmax(dim=-1)
    out = torch.zeros(clean.shape, dtype=torch.float32, device=clean.device)
    out[hidden] = logp.gather(1, clean[hidden][:, None])[:, 0]
    argmax = torch.full_like(clean, -1)
    argmax[hidden] = logp.argmax(dim=-1)
    return out, argmax
