"""Training objectives: how each system corrupts a batch and scores the model on it (see
trainer.Objective). The recipe's `task:` is something else: the system's name (docs/architecture.md).

`prepare` runs on the whole global batch (on the CPU, with the step's generator) so the noise does
not depend on how the batch is split across processes or micro-batches; `loss` runs per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.config import DiffusionConfig
from difflm.diffusion.gaussian import GaussianConfig, GaussianDiffusion
from difflm.diffusion.losses import get_loss
from difflm.diffusion.masking import (
    NoiseConfig,
    corrupt,
    counted_positions,
    decode_block_view,
    protected_mask,
    random_truncate,
)
from difflm.diffusion.schedules import build_schedule, sample_t
from difflm.errors import DifflmError
from difflm.models.block_attention import bd3_lookahead_bias, bd3_training_bias, lookahead_positions
from difflm.models.layers import padding_bias

Batch = dict[str, Tensor]


class MaskedDiffusionObjective:
    """Masked diffusion (LLaDA / MDLM): draw t, mask at rate p(t), CE on masked tokens times w(t).

    The named losses divide by `inv_weight`; we hand them 1/w(t), which is p(t) itself for the linear
    schedule (LLaDA's 1/t weight) and keeps the ELBO weight right for every other schedule.
    Protected positions (prompt, padding, `special_ids`) are never corrupted.
    `attention_bias_fn(batch) -> [B, 1, L, L]` (optional, e.g. block attention) builds an additive
    bias from the (possibly truncated) batch in `prepare`, one row per example so the trainer can
    split it; `loss` adds it to the padding bias.
    `num_steps` puts t on the grid k / num_steps (k = 1..num_steps) of a discrete-time chain.
    `cfg.draw = "count"` skips t: each block (or sequence) masks a uniform count of its tokens with
    weight n/m (`masking.counted_positions`), the same ELBO with bounded weights.
    `model_inputs` names batch entries (e.g. "cond") passed through `prepare` and handed to the
    model as keyword arguments. `packed_logits` asks the model for logits at the loss positions
    only (`model(..., logits_at=positions)` -> [N, V]): with a large vocabulary and short, padded
    sequences the vocabulary projection of the other positions is most of the step's cost.

    Block diffusion (`cfg.block_length = K`, BD3-LM): every block of K tokens draws its own t, and
    the model sees the noisy and the clean copy of the sequence in one forward of length 2L (both at
    positions 0..L-1) under `bd3_training_bias`, so each block is denoised given the clean earlier
    blocks; the loss is read off the noisy copy. The model must take `position_ids`.
    """

    def __init__(
        self,
        cfg: DiffusionConfig,
        *,
        mask_token_id: int,
        vocab_size: int,
        special_ids: Sequence[int] = (),
        attention_bias_fn: Callable[[Batch], Tensor] | None = None,
        num_steps: int | None = None,
        model_inputs: Sequence[str] = (),
        packed_logits: bool = False,
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
        self.attention_bias_fn = attention_bias_fn
        if num_steps and cfg.draw == "count":
            raise DifflmError("a discrete-time chain (num_steps) draws times: set diffusion.draw=time")
        self.num_steps = num_steps
        self.model_inputs = tuple(model_inputs)
        self.packed_logits = packed_logits

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        if self.cfg.random_length_prob > 0:
            batch = random_truncate(batch, self.cfg.random_length_prob, generator)
        ids = batch["input_ids"]  # [B, L]
        protected = protected_mask(
            ids,
            prompt_lengths=batch.get("prompt_lengths"),
            attention_mask=batch.get("attention_mask"),
            special_ids=self.special_ids,
        )
        if self.cfg.draw == "count":
            noised, inv_weight = counted_positions(
                ~protected, self._uniforms(ids, generator), generator, self.cfg.block_length
            )
            noisy = ids.masked_fill(noised, self.mask_token_id)
        else:
            t = self._times(ids, generator)  # [B], or [B, L] with blocks
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
            inv_weight = 1.0 / self.schedule.weight(t)
        scored = ~protected
        if self.cfg.decode_block is not None:
            noisy, in_block = decode_block_view(
                ids, noisy, protected, self.cfg.decode_block, self.mask_token_id, generator,
                offset=self.cfg.decode_offset,
            )
            noised, scored = noised & in_block, scored & in_block
        out = {
            "input_ids": ids,
            "noisy": noisy,
            "noised": noised,
            "inv_weight": inv_weight,
        }
        if "attention_mask" in batch:
            out["attention_mask"] = batch["attention_mask"]
        if "prompt_lengths" in batch or self.cfg.decode_block is not None:
            out["loss_mask"] = scored
        if self.attention_bias_fn is not None:
            out["attention_bias"] = self.attention_bias_fn(batch)  # [B, 1, L, L]
        return {**out, **{key: batch[key] for key in self.model_inputs}}

    def _uniforms(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        """One uniform in [0, 1) per example or block, [B, G] (strata in random order, see _times)."""
        B, L = ids.shape
        G = 1 if self.cfg.block_length is None else math.ceil(L / self.cfg.block_length)
        u = sample_t(B * G, generator, antithetic=self.cfg.antithetic, eps=0.0)
        return u[torch.randperm(B * G, generator=generator, device=generator.device).to(u.device)].view(B, G)

    def _times(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        """t per example [B], or per position [B, L] (constant within a block) with blocks."""
        B, L = ids.shape
        K = self.cfg.block_length
        n = B if K is None else B * math.ceil(L / K)
        t = sample_t(n, generator, antithetic=self.cfg.antithetic, eps=self.cfg.t_eps, t_max=self.cfg.t_max)
        if self.num_steps:
            t = torch.ceil(t * self.num_steps) / self.num_steps  # on the grid k / num_steps
        if K is None:
            return t
        # the antithetic strata go to blocks in random order: in row-major order one row's blocks
        # would all hold neighbouring strata (one sequence nearly clean, another nearly all masks)
        t = t[torch.randperm(n, generator=generator, device=generator.device).to(t.device)]
        return t.view(B, -1).repeat_interleave(K, dim=1)[:, :L]  # [B, L]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        bias = batch.get("attention_bias")
        if "attention_mask" in batch:
            padding = padding_bias(batch["attention_mask"])  # [B, 1, 1, L]
            bias = padding if bias is None else bias + padding
        kwargs = {key: batch[key] for key in self.model_inputs}
        positions = batch["noised"] if "loss_mask" not in batch else batch["noised"] & batch["loss_mask"]
        if self.packed_logits:
            kwargs["logits_at"] = positions
        if self.cfg.block_length is not None:
            logits = self._block_forward(model, batch["noisy"], batch["input_ids"], bias, positions, kwargs)
        else:
            logits = model(batch["noisy"], attention_bias=bias, **kwargs)  # [B, L, V] or packed [N, V]
        loss = self.loss_fn(
            logits,
            batch["input_ids"],
            batch["noisy"],
            batch["noised"],
            batch["inv_weight"],
            mask_token_id=self.mask_token_id,
            loss_mask=batch.get("loss_mask"),
            reweight_cap=self.cfg.reweight_cap,
        )
        return loss, {"mask_rate": batch["noised"].float().mean().item()}

    def _block_forward(
        self,
        model: nn.Module,
        noisy: Tensor,
        clean: Tensor,
        bias: Tensor | None,
        positions: Tensor,
        kwargs: dict,
    ) -> Tensor:
        """Logits of the noisy copy ([B, L, V], or packed [N, V]) from one forward over [x_t ; x_0]
        (followed, for a model with lookahead rows, by those rows and one spare row)."""
        L, K = noisy.shape[1], self.cfg.block_length
        if bias is not None and bias.shape[2] != 1:
            raise DifflmError(
                "diffusion.block_length does not combine with another attention bias (block attention)"
            )
        core = getattr(model, "module", model)
        inputs = torch.cat([noisy, clean], dim=1)  # [B, 2L]
        position_ids = torch.arange(L, device=noisy.device).repeat(2)  # [2L]: both copies at 0..L-1
        if getattr(core, "lookahead_row", False):
            before = lookahead_positions(L, K, device=noisy.device)  # [E]
            inputs = torch.cat([inputs, clean[:, before], clean[:, :1]], dim=1)  # [B, 2L + E + 1]
            position_ids = torch.cat([position_ids, before, position_ids[:1]])
            layout = bd3_lookahead_bias(L, K, device=noisy.device)
        else:
            layout = bd3_training_bias(L, K, device=noisy.device)  # [1, 1, 2L, 2L]
        if bias is not None:  # padding [B, 1, 1, L]: keys hidden in both copies
            rest = bias.new_zeros(*bias.shape[:3], inputs.shape[1] - 2 * L)
            layout = layout + torch.cat([bias, bias, rest], dim=-1)
        if getattr(core, "logits_shift", 0):
            return self._shifted_block_logits(model, inputs, layout, position_ids, positions, kwargs, L)
        if "logits_at" in kwargs:
            kwargs = {**kwargs, "logits_at": torch.cat([positions, torch.zeros_like(positions)], dim=1)}
        logits = model(inputs, attention_bias=layout, position_ids=position_ids, **kwargs)
        return logits if "logits_at" in kwargs else logits[:, :L]

    def _shifted_block_logits(
        self,
        model: nn.Module,
        inputs: Tensor,
        bias: Tensor,
        position_ids: Tensor,
        positions: Tensor,
        kwargs: dict,
        L: int,
    ) -> Tensor:
        """A shifted head (logits of i from output i-1) reads a block's first token from the row
        before it: its lookahead row when the model has them (shifted row 2L + 1 + e is lookahead
        row e's output), else the clean copy of the token before it, which sees exactly the
        finished blocks, as the block-causal sampler's row lo - 1 does (shifted row L + i is the
        clean copy's output i - 1); inside a block, from the noisy copy."""
        kwargs = {key: value for key, value in kwargs.items() if key != "logits_at"}
        logits = model(inputs, attention_bias=bias, position_ids=position_ids, **kwargs)  # [B, N, V]
        starts = torch.arange(self.cfg.block_length, L, self.cfg.block_length, device=inputs.device)
        rows = torch.arange(L, device=inputs.device)  # the row of `logits` each noisy position reads
        if inputs.shape[1] > 2 * L:
            rows[starts] = 2 * L + 1 + torch.arange(len(starts), device=inputs.device)
        else:
            rows[starts] = L + starts
        noisy = logits.index_select(1, rows)  # [B, L, V]
        return noisy[positions] if self.packed_logits else noisy


class AutoregressiveObjective:
    """Next-token prediction on the same blocks (the causal baseline): predict x[1:] from x[:-1]."""

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        ids = batch["input_ids"]  # [B, L]
        out = model(ids[:, :-1])
        logits = getattr(out, "logits", out)  # [B, L-1, V] (a Hugging Face causal LM returns an output object)
        targets = ids[:, 1:]
        if "attention_mask" in batch:
            targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return loss, {}


class DiffusionForcingObjective:
    """Diffusion Forcing (Chen et al. 2024) on a `DFGPT`: every token gets its own Gaussian noise
    level k ~ U{0..T-1} in embedding space and the causal model denoises the whole block.

    `prepare` draws the levels and the unit noise on the global batch; `loss` is the objective's
    loss (`GaussianDiffusion.training_loss`) plus `rounding_weight` times the rounding CE of
    x0_hat back to the tokens (`forcing_loss`).
    """

    def __init__(self, gaussian: GaussianConfig, n_embd: int) -> None:
        self.diffusion = GaussianDiffusion(gaussian)
        self.n_embd = n_embd

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        ids = batch["input_ids"]  # [B, L]
        levels = torch.randint(0, self.diffusion.config.timesteps, ids.shape, generator=generator)  # [B, L]
        noise = self.diffusion.randn((*ids.shape, self.n_embd), generator, torch.device("cpu"))  # [B, L, D]
        return {"input_ids": ids, "levels": levels, "noise": noise}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        loss, parts = forcing_loss(core, batch["input_ids"], batch["levels"], batch["noise"], net=model)
        return loss, {name: value.item() for name, value in parts.items()}


def forcing_loss(
    model: nn.Module, ids: Tensor, levels: Tensor, noise: Tensor, net: nn.Module | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion Forcing loss of tokens ids [B, L] at levels [B, L] with noise [B, L, D].

    Fixed levels (e.g. all 0) measure `rounding_nll` on nearly clean input. `net` is what the
    forward runs through (default `model`; a DistributedDataParallel wrapper, so gradients sync).
    The rounding CE uses x0_hat clamped to +-clip_noise: for pred_noise at the highest levels,
    x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a) amplifies errors by up to 1/sqrt(a).
    Returns (diffusion loss + rounding_weight * rounding CE, detached parts).
    """
    if not model.config.use_diffusion_forcing:
        raise DifflmError("the Diffusion Forcing loss needs model.use_diffusion_forcing=true")
    diffusion, gcfg = model.diffusion, model.config.gaussian
    x0 = model.embed_clean(ids)  # [B, L, D]
    k, noise = levels.to(ids.device), noise.to(x0.device)
    x_t = diffusion.q_sample(x0, k, noise)
    pred = (net or model)(x_t, k)  # [B, L, D]
    target = x0 if model.config.target_grad else x0.detach()
    loss_diffusion = diffusion.training_loss(pred, target, noise, k)
    x0_hat, _ = diffusion.split_prediction(pred, x_t, k)
    logits = model.round_logits(x0_hat.clamp(-gcfg.clip_noise, gcfg.clip_noise))  # [B, L, V]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss = loss_diffusion + gcfg.rounding_weight * nll
    return loss, {"diffusion_loss": loss_diffusion.detach(), "rounding_nll": nll.detach()}
