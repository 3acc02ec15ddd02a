"""Masked-diffusion training losses: one weighted cross-entropy (`elbo_loss`) and named presets.

`elbo_loss` is the only implementation: cross-entropy on noised positions, times a per-example
weight (the schedule's p'(t)/p(t), or 1/p for LLaDA), normalised either by B*L (LLaDA pre-training)
or per example by its answer length (LLaDA SFT). The CE runs in float32 even for bf16 logits,
and only on the selected positions, so a large vocabulary is never upcast for the whole batch.

The named losses in `LOSSES` share one signature and take `inv_weight` = 1/w(t), the inverse of
the schedule's ELBO weight (t itself for the linear schedule, as in LLaDA); they weight each
example's CE by 1/inv_weight.

SUBS (MDLM's parameterisation, `banned_id` / `NamedLoss.subs`): the mask token's logit is -inf in
the loss's log-softmax, so a masked position never predicts the mask. The sampler bans the mask
token too, so the SUBS loss is the ELBO of the model the sampler actually draws from, and it is
tighter than the plain loss, which spends probability on the mask. `difflm eval` reports it
(`elbo_nll` uses "mdlm"). Training uses whichever preset `diffusion.loss` names: the recipes keep
"elbo" (LLaDA's pre-training loss, no SUBS; called "guidelines" before, a name configs may still
hold) so their recorded runs reproduce; "mdlm" trains with SUBS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.errors import DifflmError

NORMALIZATIONS = ("tokens", "answer")


def _check_shapes(logits: Tensor, targets: Tensor, noised: Tensor, weight: Tensor) -> None:
    if logits.dim() not in (2, 3):
        raise DifflmError(f"logits must be [B, L, V] (or packed [N, V]), got shape {tuple(logits.shape)}")
    batch, length = targets.shape if logits.dim() == 2 else logits.shape[:2]
    for name, tensor in (("targets", targets), ("noised", noised)):
        if tensor.shape != (batch, length):
            raise DifflmError(
                f"{name} shape {tuple(tensor.shape)} must be ({batch}, {length}) to match logits"
            )
    if weight.shape not in ((batch,), (batch, length)):
        raise DifflmError(
            f"weight shape {tuple(weight.shape)} must be ({batch},) or ({batch}, {length}): per example or per position"
        )


def elbo_loss(
    logits: Tensor,
    targets: Tensor,
    noised: Tensor,
    weight: Tensor,
    *,
    reweight_cap: float | None = None,
    label_smoothing: float = 0.0,
    normalize: str = "tokens",
    loss_mask: Tensor | None = None,
    banned_id: int | None = None,
) -> Tensor:
    """Weighted CE over noised positions, a float32 scalar.

    logits [B, L, V], targets [B, L], noised [B, L] bool, weight [B] or per position [B, L] (block
    diffusion: each block has its own t), capped at `reweight_cap`.
    Positions counted: noised, and inside `loss_mask` [B, L] when given. `logits` may instead be
    packed [N, V]: the rows of the N counted positions in row-major order (a model that skips the
    vocabulary projection elsewhere; see MaskedDiffusionObjective's packed_logits).
    normalize='tokens': sum / (B * L). normalize='answer': each example's sum divided by its
    number of `loss_mask` positions, then the mean over the batch (needs `loss_mask`).
    `banned_id` (SUBS): a token the model may never predict; its logit is -inf in the log-softmax.
    """
    _check_shapes(logits, targets, noised, weight)
    if normalize not in NORMALIZATIONS:
        raise DifflmError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if normalize == "answer" and loss_mask is None:
        raise DifflmError("normalize='answer' needs loss_mask marking the answer positions")
    if reweight_cap is not None and not reweight_cap > 0:
        raise DifflmError(f"reweight_cap {reweight_cap} must be > 0 (or None for no cap)")
    if not 0.0 <= label_smoothing < 1.0:
        raise DifflmError(f"label_smoothing {label_smoothing} outside [0, 1)")
    if banned_id is not None and label_smoothing > 0:
        raise DifflmError(
            "label smoothing puts mass on the banned (mask) token: use SUBS or smoothing, not both"
        )
    batch, length = targets.shape

    positions = noised.bool() if loss_mask is None else noised.bool() & loss_mask.bool()  # [B, L]
    w = weight.to(device=logits.device, dtype=torch.float32)  # [B] or [B, L]
    if reweight_cap is not None:
        w = w.clamp(max=reweight_cap)
    if normalize == "tokens":
        denom = torch.full((batch,), float(batch * length), device=w.device)  # [B]
    else:
        denom = loss_mask.sum(dim=1).clamp(min=1).to(torch.float32) * batch  # [B]
    w = w[:, None] if w.dim() == 1 else w  # [B, 1] or [B, L]
    scale = (w / denom[:, None]).expand(batch, length)[positions]  # [N]

    if logits.dim() == 2 and logits.shape[0] != positions.sum():
        raise DifflmError(
            f"packed logits have {logits.shape[0]} rows but {int(positions.sum())} positions are counted"
        )
    rows = (logits if logits.dim() == 2 else logits[positions]).float()  # [N, V]
    counted = targets[positions]  # [N]
    if banned_id is not None:
        if (counted == banned_id).any():
            raise DifflmError(f"a target equals the banned (mask) token id {banned_id}: SUBS cannot score it")
        rows = rows.index_fill(1, torch.tensor([banned_id], device=rows.device), float("-inf"))
    ce = F.cross_entropy(rows, counted, reduction="none", label_smoothing=label_smoothing)  # [N]
    return (ce * scale).sum()


@dataclass(frozen=True)
class NamedLoss:
    """A preset of `elbo_loss` with the ELBO weight 1/inv_weight; every entry of `LOSSES` is one.

    `from_mask_id`: loss positions are `noisy_ids == mask_token_id` (dLLM) instead of `noised`.
    `normalize="answer"` (SFT) divides each example by its answer length and needs `loss_mask`.
    `subs`: MDLM's SUBS parameterisation, the mask token's logit is -inf in the log-softmax.
    """

    from_mask_id: bool = False
    label_smoothing: float = 0.0
    normalize: str = "tokens"
    subs: bool = False

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        noisy_ids: Tensor,
        noised: Tensor,
        inv_weight: Tensor,
        *,
        mask_token_id: int,
        loss_mask: Tensor | None = None,
        reweight_cap: float | None = None,
    ) -> Tensor:
        if self.normalize == "answer" and loss_mask is None:
            raise DifflmError("the sft loss needs loss_mask marking answer positions (non-prompt tokens)")
        positions = noisy_ids == mask_token_id if self.from_mask_id else noised  # [B, L]
        return elbo_loss(
            logits,
            targets,
            positions,
            1.0 / inv_weight.float(),
            reweight_cap=reweight_cap,
            label_smoothing=self.label_smoothing,
            normalize=self.normalize,
            loss_mask=loss_mask,
            banned_id=mask_token_id if self.subs else None,
        )


LOSSES: dict[str, NamedLoss] = {
    "elbo": NamedLoss(),  # LLaDA pre-training: CE on masked / inv_weight, divided by B * L
    "dllm": NamedLoss(from_mask_id=True),  # differs only where a clean token equals the mask id
    "soft_ce": NamedLoss(label_smoothing=0.1),
    "sft": NamedLoss(normalize="answer"),  # LLaDA SFT: per-example answer length
    "mdlm": NamedLoss(subs=True),  # elbo with MDLM's SUBS: the tighter bound `difflm eval` reports
}


def get_loss(name: str) -> NamedLoss:
    """The named loss from `LOSSES`."""
    if name not in LOSSES:
        raise DifflmError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
