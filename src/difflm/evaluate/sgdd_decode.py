"""Decoding SGDD vectors into text, and the scoring that semantic verification builds on.

Decoding goes through the one engine (`difflm.sampling.unmask.infill`): each row's length is
chosen first (the model's length head, or given), positions past it stay [PAD] and are attended
out, and the rest is revealed MaskGIT-style (confidence, cosine reveal schedule, 16 steps). For
guidance the conditional and unconditional rows differ only in `cond_drop`, so the engine stacks
them into one forward and combines the logits as cond + w * (cond - uncond).

Verification (`difflm.evaluate.sgdd_verify`) needs two more things from here: what the decoder
thinks of each token of a hypothesis (`masked_predictions`) and how close a text's vector is to
the target (`cosine_of`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.config import system_config
from difflm.errors import DifflmError
from difflm.models.layers import padding_bias
from difflm.models.sgdd import Shortlisted
from difflm.pretrained import Pretrained
from difflm.sampling.denormals import flush_denormals
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


@torch.inference_mode()  # less bookkeeping per op than no_grad: docs/results/sgdd/inference_mode_ab.txt
def decode_vectors(
    pre: Pretrained,
    vectors: Tensor,
    *,
    cfg_scale: float,
    lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 0.0,
) -> list[list[int]]:
    """Token ids of the text each vector [B, D] decodes to (length from the head unless given).
    Runs in inference mode: only Python lists leave it, so no inference tensor reaches training."""
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


@flush_denormals()  # the decoder's tanh-GELUs are ~6x slower on denormals: sampling/denormals.py
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
    ids = ids.masked_fill(fill, pre.tokenizer.mask_token_id)
    model, suppress = pre.model, suppressed_ids(pre.tokenizer)
    B = len(ids)
    fixed = pre.model.conditioning(vectors.to(device), pre.model.t_grid(real.to(device)), null=cfg_scale > 0)
    cond = {"conditioning": fixed, "cond_rows": torch.arange(B, device=device)}
    null = {"cond_rows": torch.full((B,), B, device=device)}  # row B of `fixed` (guided only): the null vector
    bias = None if bool(real.all()) else padding_bias(real.to(device))  # as the engine builds it
    if scfg.shortlist:  # decode over the shortlist's indices, then map back to token ids
        guided = null["cond_rows"] if cfg_scale > 0 else None
        vocab, h_cond, h_null = shortlist(pre, vectors, ids, fill, scfg.shortlist, bias, cond, guided)
        model = Shortlisted(pre.model, vocab)
        ids = model.index(ids.to(device))
        # the shortlist's forward is the first step's forward (its unconditional rows as well
        # when guided), projected on the shortlist here: it answers that call
        logits = pre.model.project_hidden(h_cond, model.head)
        uncond = None if h_null is None else (guided, pre.model.project_hidden(h_null, model.head))
        model.remember(ids, fill.to(device), bias, cond["cond_rows"], logits, uncond)
        suppress = [i for i, token in enumerate(model.vocab.tolist()) if token in suppress]
    count = int(fill.sum(1).max())
    cfg = sample_config(scfg, count, cfg_scale, suppress, temperature=temperature)
    drop = torch.zeros(B, dtype=torch.bool, device=device)
    out = infill(
        model,
        ids.to(device),
        fill.to(device),
        cfg,
        attention_mask=real.long().to(device),
        generator=generator,
        model_kwargs={"cond": vectors.to(device), "cond_drop": drop, **cond},
        uncond_kwargs={"cond_drop": ~drop, **null},
    ).tokens
    return (model.vocab[out] if scfg.shortlist else out).cpu()


@torch.no_grad()
def shortlist(
    pre: Pretrained,
    vectors: Tensor,
    ids: Tensor,
    fill: Tensor,
    k: int,
    bias: Tensor | None = None,
    extra: dict | None = None,
    uncond_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token ids [K]: the union over the `fill` positions of ids [B, W] of their k most likely
    tokens given the vector, from one forward before decoding starts (no guidance), and every id
    already in ids ([MASK], [PAD], the context); that forward's final hidden states [N, C] at the
    fill positions; and, given uncond_rows [B] (conditioning rows of a guided decode's
    unconditional copy, see `refill`), that copy's [N, C] from the same forward (the rows stacked
    as the guided steps stack them), else None. bias: the attention bias of the forward; `extra`:
    more keyword arguments of it (its `cond_rows` and `conditioning`)."""
    device = device_of(pre)
    ids, fill, vectors, extra = ids.to(device), fill.to(device), vectors.to(device), extra or {}
    copies = 1 if uncond_rows is None else 2
    rows = extra.get("cond_rows")
    if uncond_rows is not None:
        rows = torch.cat([rows, uncond_rows])
    h = pre.model(
        ids.repeat(copies, 1),
        attention_bias=None if bias is None else bias.repeat(copies, 1, 1, 1),
        cond=vectors.repeat(copies, 1),
        logits_at=fill.repeat(copies, 1),
        head=pre.model.hidden_head(),
        **{**extra, "cond_rows": rows},
    )  # [copies * N, C]: the conditional rows' positions first
    h_cond, h_null = (h, None) if uncond_rows is None else h.chunk(2)
    top = pre.model.top_tokens(h_cond, min(k, pre.model.config.vocab_size))  # [N, k]
    return torch.cat([top.flatten(), ids.flatten()]).unique(), h_cond, h_null


@torch.no_grad()
def token_logprobs(pre: Pretrained, vectors: Tensor, ids: Tensor, real: Tensor) -> Tensor:
    """log p(token_i | the rest, vector) per position [B, W]; +inf where not `real`."""
    return masked_predictions(pre, vectors, ids, real)[0]


@torch.no_grad()
@flush_denormals()
def masked_predictions(
    pre: Pretrained, vectors: Tensor, ids: Tensor, real: Tensor, k: int = 0
) -> tuple[Tensor, Tensor]:
    """What the decoder thinks of each real token of ids [B, W] with that token masked.

    Each token is masked in one of SCORE_GROUPS forwards (with its interleaved group). Returns
    log p(token_i | the rest, vector) [B, W] (+inf where not `real`) and the k most likely other
    tokens at each position [B, W, k] (specials excluded; 0 where not `real`)."""
    device = device_of(pre)
    logp = torch.full(ids.shape, math.inf)
    proposals = torch.zeros(*ids.shape, k, dtype=torch.long)
    bias = torch.zeros(real.shape, device=device).masked_fill(~real.to(device), -math.inf)[:, None, None, :]
    positions = torch.arange(ids.shape[1])[None, :]
    for group in range(min(SCORE_GROUPS, ids.shape[1])):
        masked = real & (positions % SCORE_GROUPS == group)  # [B, W]
        if not masked.any():
            continue
        inputs = ids.masked_fill(masked, pre.tokenizer.mask_token_id).to(device)
        at = masked.to(device)  # only the scored positions go through the vocabulary projection
        scores = pre.model(inputs, attention_bias=bias, cond=vectors.to(device), logits_at=at)  # [N, V]
        scores = scores.float().cpu().log_softmax(-1)
        current = ids[masked][:, None]  # [N, 1]
        logp[masked] = scores.gather(-1, current)[:, 0]
        if k:
            proposals[masked] = writable_topk(pre, scores.scatter(-1, current, -math.inf), k)  # [N, k]
    return logp, proposals


def writable_topk(pre: Pretrained, scores: Tensor, k: int) -> Tensor:
    """The k best token ids [N, k] of scores [N, V] among those the decoder may write (no specials,
    no [MASK])."""
    banned = torch.tensor(suppressed_ids(pre.tokenizer) + [pre.tokenizer.mask_token_id])
    return scores.index_fill(-1, banned.to(scores.device), -math.inf).topk(k, dim=-1).indices


def cosine_to(encoder, pre: Pretrained, ids: Tensor, lengths: Tensor, targets: Tensor) -> Tensor:
    """Cosine [M] between the encoder's vectors of the decoded rows and the target vectors [M, D]."""
    return cosine_of(encoder, pre, [row[:n].tolist() for row, n in zip(ids, lengths.tolist(), strict=True)], targets)


def cosine_of(encoder, pre: Pretrained, seqs: list[list[int]], targets: Tensor, chunk: int = 256) -> Tensor:
    """Cosine [M] between the encoder's vectors of the texts of token lists and targets [M, D],
    `chunk` texts per encoder batch, shortest first (a batch is padded to its longest text)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    cosine = torch.zeros(len(seqs))
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        batch, _ = encoder.tokenize([pre.tokenizer.decode(seqs[i]) for i in part])
        target = targets[part].cpu().float()
        cosine[part] = F.cosine_similarity(encoder.embed(batch).cpu().float(), target, dim=-1)
    return cosine


def device_of(pre: Pretrained) -> torch.device:
    return next(pre.model.parameters()).device
