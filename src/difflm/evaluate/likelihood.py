"""Likelihood metrics on a validation split: the masked-diffusion ELBO bound and the AR loss.

The ELBO bound: for each sequence and Monte-Carlo draw of t, mask at rate p(t) and score
w(t) * sum of CE on masked tokens / L. Its mean is an upper bound on the NLL per token
(LLaDA / MDLM), so exp of it bounds the perplexity from above. The CE uses MDLM's SUBS
parameterisation (the mask token's logit is -inf, as the sampler bans it): the bound of the model
the sampler draws from, and tighter than the plain softmax's (see diffusion/losses.py). Draws use
a fixed seed: the same checkpoint always gets the same number.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from difflm.config import DiffusionConfig
from difflm.train.tasks import AutoregressiveTask, MaskedDiffusionTask
from difflm.train.trainer import collate, step_generator, to_device


@torch.no_grad()
def mean_task_loss(
    model,
    task,
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
    bar = tqdm(total=n_batches * samples, desc="eval", disable=not progress, dynamic_ncols=True)
    for b in range(n_batches):
        batch = collate([data[i] for i in range(b * batch_size, min(len(data), (b + 1) * batch_size))])
        for s in range(samples):
            prepared = task.prepare(batch, step_generator(seed, b * samples + s, salt=2))
            loss, _ = task.loss(model, to_device(prepared, device))
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
    task = MaskedDiffusionTask(
        DiffusionConfig(schedule=schedule, loss="mdlm", block_length=block_length),
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
    )
    return mean_task_loss(
        model,
        task,
        data,
        batch_size=batch_size,
        samples=samples,
        seed=seed,
        max_batches=max_batches,
        progress=progress,
    )


def ar_nll(
    model, data, *, batch_size: int = 32, max_batches: int | None = None, progress: bool = True
) -> float:
    """Next-token CE per predicted token (nats)."""
    return mean_task_loss(
        model,
        AutoregressiveTask(),
        data,
        batch_size=batch_size,
        samples=1,
        seed=0,
        max_batches=max_batches,
        progress=progress,
    )
