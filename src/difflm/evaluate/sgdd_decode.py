"""Decoding SGDD vectors into text, plainly or with semantic verification by the frozen encoder.

Decoding goes through the one engine (`difflm.sampling.unmask.infill`): each row's length is
chosen first (the model's length head, or given), positions past it stay [PAD] and are attended
out, and the rest is revealed MaskGIT-style (confidence, cosine reveal schedule, 16 steps). For
guidance the conditional and unconditional rows differ only in `cond_drop`, so the engine stacks
them into one forward and combines the logits as cond + w * (cond - uncond).

One forward pass from one vector is a weak inverter; SGDD has what correction needs: an encoder that
can score any candidate text against the target vector, and a decoder that can re-mask and re-write.

- Best-of-N: decode N candidates per vector in one batch (the greedy decode at each of the length
  head's top-k lengths, then temperature samples at the most likely length), re-encode all of them
  and keep the one whose vector is closest (cosine) to the target.
- Correction rounds: score every token of the current hypothesis by re-masking it (the tokens are
  split into a few interleaved groups, one forward per group), re-mask the least likely share of
  them and decode those positions again, conditioned on the target vector, N times; a variant
  replaces the hypothesis only if its vector is closer, so a round never lowers the similarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.config import system_config
from difflm.errors import DifflmError
from difflm.models.layers import padding_bias
from difflm.pretrained import Pretrained
from difflm.sampling.settings import SampleConfig
from difflm.sampling.unmask import infill
from difflm.systems.sgdd import SGDDSystemConfig

SCORE_GROUPS = 4  # forwards that score a hypothesis: token i is masked in group i % SCORE_GROUPS


def sample_config(
    scfg: SGDDSystemConfig, length: int, cfg_scale: float, suppress: list[int], **kw
) -> SampleConfig:
    return SampleConfig(
        gen_length=length,
        steps=min(scfg.sample_steps, length),
        reveal_schedule=scfg.reveal_schedule,
        remasking=scfg.remasking,
        cfg_scale=cfg_scale,
        suppress_tokens=suppress,
        **kw,
    )


def suppressed_ids(tokenizer) -> list[int]:
    """Special tokens the decoder may never write ([MASK] is the engine's own business)."""
    return sorted(i for i in tokenizer.special_ids if i != tokenizer.mask_token_id)


@torch.no_grad()
def decode_vectors(
    pre: Pretrained,
    vectors: Tensor,
    *,
    cfg_scale: float,
    lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 0.0,
) -> list[list[int]]:
    """Token ids of the text each vector [B, D] decodes to (length from the head unless given)."""
    if cfg_scale < 0:
        raise DifflmError(f"CFG scale must be >= 0 (0 = no guidance), got {cfg_scale}")
    block = pre.model.max_length
    lengths = (
        pre.model.predict_length(vectors.to(device_of(pre))).cpu()
        if lengths is None
        else lengths.clamp(1, block)
    )
    ids = decode_rows(pre, vectors, lengths.cpu(), temperature, cfg_scale, generator)
    return [row[:n].tolist() for row, n in zip(ids, lengths.tolist(), strict=True)]


@dataclass
class Verification:
    """How hard decoding works for the target vector (1 candidate, 0 rounds = plain decoding)."""

    candidates: int = 1  # N: decoded per vector, and variants per correction round
    rounds: int = 0  # R: correction rounds after best-of-N
    remask: float = 0.25  # share of the hypothesis re-masked per round (at least one token)
    length_topk: int = 3  # greedy candidates at the length head's top-k lengths (at most N)
    temperature: float = 0.7  # of the candidates beyond the greedy ones

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.rounds < 0 or self.length_topk < 1:
            raise DifflmError(
                f"verification needs candidates >= 1, rounds >= 0, length_topk >= 1; got "
                f"{self.candidates}, {self.rounds}, {self.length_topk}"
            )
        if not 0.0 < self.remask <= 1.0:
            raise DifflmError(f"remask share must be in (0, 1], got {self.remask}")


@dataclass
class Hypotheses:
    """The chosen text per vector: token ids [B, W] (pad past `lengths` [B]) and cosine [B]."""

    ids: Tensor
    lengths: Tensor
    cosine: Tensor

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.ids, self.lengths.tolist(), strict=True)]


@torch.no_grad()
def verified_decode(
    pre: Pretrained,
    encoder,
    vectors: Tensor,
    settings: Verification,
    *,
    cfg_scale: float,
    generator: torch.Generator | None = None,
    lengths: Tensor | None = None,
) -> Hypotheses:
    """Decode vectors [B, D] with best-of-N, then `settings.rounds` correction rounds.

    The target of every comparison is the vector itself (the encoder's vector of the source)."""
    if cfg_scale < 0:
        raise DifflmError(f"CFG scale must be >= 0 (0 = no guidance), got {cfg_scale}")
    best = best_of_n(pre, encoder, vectors, settings, cfg_scale, generator, lengths)
    for _ in range(settings.rounds):
        best = correction_round(pre, encoder, vectors, best, settings, cfg_scale, generator)
    return best


def best_of_n(
    pre: Pretrained,
    encoder,
    vectors: Tensor,
    settings: Verification,
    cfg_scale: float,
    generator: torch.Generator | None,
    lengths: Tensor | None = None,
) -> Hypotheses:
    """N candidates per vector, decoded in one batch per temperature; the closest is kept."""
    B, N = len(vectors), settings.candidates
    row_lengths, temps = candidate_plan(pre, vectors, settings, lengths)  # [B, N] each
    ids = torch.full((B, N, int(row_lengths.max())), pre.tokenizer.pad_token_id, dtype=torch.long)
    for temperature in sorted(set(temps.flatten().tolist())):
        rows, cols = (temps == temperature).nonzero(as_tuple=True)
        out = decode_rows(pre, vectors[rows], row_lengths[rows, cols], temperature, cfg_scale, generator)
        ids[rows, cols, : out.shape[1]] = out
    flat_len = row_lengths.flatten()
    cos = cosine_to(encoder, pre, ids.flatten(0, 1), flat_len, vectors.repeat_interleave(N, 0)).view(B, N)
    pick = cos.argmax(1)  # [B]
    arange = torch.arange(B)
    return Hypotheses(ids[arange, pick], row_lengths[arange, pick], cos[arange, pick])


def candidate_plan(
    pre: Pretrained, vectors: Tensor, settings: Verification, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Length and temperature of each candidate [B, N]: greedy at the top-k lengths first."""
    B, N = len(vectors), settings.candidates
    if lengths is not None:
        top = lengths.clamp(1, pre.model.max_length).view(B, 1)  # [B, 1]
    else:
        k = min(settings.length_topk, N)
        top = pre.model.length_logits(vectors.to(device_of(pre))).topk(k, dim=-1).indices.cpu() + 1  # [B, k]
    k = top.shape[1]
    row_lengths = torch.cat([top, top[:, :1].expand(B, N - k)], 1) if N > k else top[:, :N]
    temps = torch.tensor([0.0] * min(k, N) + [settings.temperature] * max(N - k, 0))
    return row_lengths, temps.expand(B, N).clone()


def decode_rows(
    pre: Pretrained,
    vectors: Tensor,
    lengths: Tensor,
    temperature: float,
    cfg_scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Fully masked rows of the given lengths decoded; ids [B, max length], pad past each end."""
    width = int(lengths.max())
    fill = torch.arange(width)[None, :] < lengths[:, None]  # [B, W]
    ids = torch.full(fill.shape, pre.tokenizer.pad_token_id, dtype=torch.long)
    return refill(pre, vectors, ids, fill, fill, temperature, cfg_scale, generator)


def refill(
    pre: Pretrained,
    vectors: Tensor,
    ids: Tensor,
    real: Tensor,
    fill: Tensor,
    temperature: float,
    cfg_scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Rewrite the `fill` [B, W] positions of ids [B, W] (real tokens: `real`) with the engine."""
    device = device_of(pre)
    scfg = system_config(pre.config, SGDDSystemConfig)
    count = int(fill.sum(1).max())
    cfg = sample_config(scfg, count, cfg_scale, suppressed_ids(pre.tokenizer), temperature=temperature)
    drop = torch.zeros(len(ids), dtype=torch.bool, device=device)
    ids = ids.masked_fill(fill, pre.tokenizer.mask_token_id)
    run = lambda: infill(  # noqa: E731
        pre.model,
        ids.to(device),
        fill.to(device),
        cfg,
        attention_mask=real.long().to(device),
        generator=generator,
        model_kwargs={"cond": vectors.to(device), "cond_drop": drop},
        uncond_kwargs={"cond_drop": ~drop},
    )
    if not scfg.shortlist:
        return run().tokens.cpu()
    with pre.model.restricted_vocabulary(shortlist(pre, vectors, ids, real, fill, scfg.shortlist)):
        return run().tokens.cpu()


@torch.no_grad()
def shortlist(pre: Pretrained, vectors: Tensor, ids: Tensor, real: Tensor, fill: Tensor, k: int) -> Tensor:
    """Token ids [K]: the union over the `fill` positions of ids [B, W] of their k most likely
    tokens given the vector, from one forward before decoding starts (no guidance)."""
    device = device_of(pre)
    logits = pre.model(
        ids.to(device),
        attention_bias=padding_bias(real.to(device)),
        cond=vectors.to(device),
        logits_at=fill.to(device),
    )  # [N, V]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.unique()


def correction_round(
    pre: Pretrained,
    encoder,
    vectors: Tensor,
    current: Hypotheses,
    settings: Verification,
    cfg_scale: float,
    generator: torch.Generator | None,
) -> Hypotheses:
    """Re-mask the least likely tokens, rewrite them N times, keep any variant that is closer."""
    B, N = len(vectors), settings.candidates
    real = torch.arange(current.ids.shape[1])[None, :] < current.lengths[:, None]  # [B, W]
    logp = token_logprobs(pre, vectors, current.ids, real)  # [B, W], +inf at pads
    count = (current.lengths.float() * settings.remask).ceil().long().clamp(min=1)  # [B]
    ranks = logp.argsort(1).argsort(1)  # rank of each position, least likely first
    fill = (ranks < count[:, None]) & real  # [B, W]
    rep = lambda x: x.repeat_interleave(N, 0)  # noqa: E731  (rows of variants, grouped per vector)
    temps = [0.0] + [settings.temperature] * (N - 1)
    variants = torch.cat(
        [refill(pre, vectors, current.ids, real, fill, t, cfg_scale, generator)[:, None] for t in temps], 1
    )  # [B, N, W]
    cos = cosine_to(encoder, pre, variants.flatten(0, 1), rep(current.lengths), rep(vectors)).view(B, N)
    best_cos, pick = cos.max(1)
    better = best_cos > current.cosine  # [B]
    ids = torch.where(better[:, None], variants[torch.arange(B), pick], current.ids)
    return Hypotheses(ids, current.lengths, torch.where(better, best_cos, current.cosine))


@torch.no_grad()
def token_logprobs(pre: Pretrained, vectors: Tensor, ids: Tensor, real: Tensor) -> Tensor:
    """log p(token_i | the rest, vector) per position [B, W], each token masked in one of
    SCORE_GROUPS forwards (with its interleaved group); +inf where not `real`."""
    device = device_of(pre)
    out = torch.full(ids.shape, math.inf)
    bias = torch.zeros(real.shape, device=device).masked_fill(~real.to(device), -math.inf)[:, None, None, :]
    positions = torch.arange(ids.shape[1])[None, :]
    for group in range(min(SCORE_GROUPS, ids.shape[1])):
        masked = real & (positions % SCORE_GROUPS == group)  # [B, W]
        if not masked.any():
            continue
        inputs = ids.masked_fill(masked, pre.tokenizer.mask_token_id).to(device)
        at = masked.to(device)  # only the scored positions go through the vocabulary projection
        logits = pre.model(inputs, attention_bias=bias, cond=vectors.to(device), logits_at=at)  # [N, V]
        out[masked] = logits.float().cpu().log_softmax(-1).gather(-1, ids[masked][:, None])[:, 0]
    return out


def cosine_to(encoder, pre: Pretrained, ids: Tensor, lengths: Tensor, targets: Tensor) -> Tensor:
    """Cosine [M] between the encoder's vectors of the decoded rows and the target vectors [M, D]."""
    texts = [pre.tokenizer.decode(row[:n].tolist()) for row, n in zip(ids, lengths.tolist(), strict=True)]
    batch, _ = encoder.tokenize(texts)
    return F.cosine_similarity(encoder.embed(batch).cpu().float(), targets.cpu().float(), dim=-1)


def device_of(pre: Pretrained) -> torch.device:
    return next(pre.model.parameters()).device
