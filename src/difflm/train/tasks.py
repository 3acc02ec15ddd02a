"""Tasks: how each system corrupts a batch and scores the model on it (see trainer.Task).

`prepare` runs on the whole global batch (on the CPU, with the step's generator) so the noise does
not depend on how the batch is split across processes or micro-batches; `loss` runs per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.config import DiffusionConfig
from difflm.diffusion.losses import get_loss
from difflm.diffusion.masking import NoiseConfig, corrupt, protected_mask, random_truncate
from difflm.diffusion.schedules import build_schedule, sample_t
from difflm.models.layers import padding_bias

Batch = dict[str, Tensor]


class MaskedDiffusionTask:
    """Masked diffusion (LLaDA / MDLM): draw t, mask at rate p(t), CE on masked tokens times w(t).

    The named losses divide by `p_mask`; we hand them 1/w(t), which is p(t) itself for the linear
    schedule (LLaDA's 1/t weight) and keeps the ELBO weight right for every other schedule.
    Protected positions (prompt, padding, `special_ids`) are never corrupted.
    """

    def __init__(
        self, cfg: DiffusionConfig, *, mask_token_id: int, vocab_size: int, special_ids: Sequence[int] = ()
    ):
        self.cfg = cfg
        self.schedule = build_schedule(cfg.schedule, **cfg.schedule_params)
        self.noise = NoiseConfig(
            kind=cfg.noise,
            min_rate=cfg.min_rate,
            span_prob=cfg.span_prob,
            random_length_prob=cfg.random_length_prob,
        )
        self.loss_fn = get_loss(cfg.loss)
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_ids = tuple(special_ids)

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        if self.cfg.random_length_prob > 0:
            batch = random_truncate(batch, self.cfg.random_length_prob, generator)
        ids = batch["input_ids"]  # [B, L]
        t = sample_t(ids.shape[0], generator, antithetic=self.cfg.antithetic, eps=self.cfg.t_eps)  # [B]
        protected = protected_mask(
            ids,
            prompt_lengths=batch.get("prompt_lengths"),
            attention_mask=batch.get("attention_mask"),
            special_ids=self.special_ids,
        )
        noisy, noised = corrupt(
            ids,
            self.schedule.rate(t),
            mask_token_id=self.mask_token_id,
            cfg=self.noise,
            generator=generator,
            protected=protected,
            vocab_size=self.vocab_size,
            exclude_ids=self.special_ids,
        )
        out = {"input_ids": ids, "noisy": noisy, "noised": noised, "p_mask": 1.0 / self.schedule.weight(t)}
        if "attention_mask" in batch:
            out["attention_mask"] = batch["attention_mask"]
        if "prompt_lengths" in batch:
            out["loss_mask"] = ~protected
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        bias = padding_bias(batch["attention_mask"]) if "attention_mask" in batch else None
        logits = model(batch["noisy"], attention_bias=bias)  # [B, L, V]
        loss = self.loss_fn(
            logits,
            batch["input_ids"],
            batch["noisy"],
            batch["noised"],
            batch["p_mask"],
            mask_token_id=self.mask_token_id,
            loss_mask=batch.get("loss_mask"),
            reweight_cap=self.cfg.reweight_cap,
        )
        return loss, {"mask_rate": batch["noised"].float().mean().item()}


class AutoregressiveTask:
    """Next-token prediction on the same blocks (the causal baseline): predict x[1:] from x[:-1]."""

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        ids = batch["input_ids"]  # [B, L]
        logits = model(ids[:, :-1])  # [B, L-1, V]
        targets = ids[:, 1:]
        if "attention_mask" in batch:
            targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return loss, {}
