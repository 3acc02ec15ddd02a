"""Semantic verification at decode time: the frozen encoder scores candidates against the target.

One forward pass from one vector is a weak inverter; SGDD has what correction needs: an encoder that
can score any candidate text against the target vector, and a decoder that can re-mask and re-write.
Three stages, each optional, each keeping a row's hypothesis unless the encoder finds the new one
closer (cosine), so none ever lowers the similarity; a fourth, fluency, may trade a little of it
for word order:

- Best-of-N: decode N candidates per vector in one batch (the greedy decode at each of the length
  head's top-k lengths, then temperature samples at the most likely length), re-encode all of them
  and keep the one whose vector is closest to the target.
- Correction rounds (R): score every token of the hypothesis by re-masking it, re-mask the least
  likely share of them and decode those positions again, conditioned on the target vector, N times.
- Edit search (S rounds): best-first search over single-token edits. The decoder proposes, for
  every position where it is not sure of the current token, its k most likely other tokens given
  the rest (substitutions) and, for every gap, its k / 2 best guesses for a new token there
  (insertions); deletions and swaps of neighbouring tokens need no proposal. Each round expands the
  closest text not expanded yet (its edits, and all its improving substitutions applied together,
  are re-encoded and remembered), so a sentence stuck at a text no single edit improves goes on from
  the next closest ones instead of stopping; it stops after `patience` rounds without a closer
  text. Unlike re-masking, edits can change the length, which the length head gets wrong for most
  sentences.
- Fluency (optional, after the search): the encoder hardly sees word order, so among the search's
  closest texts the answer is the one with the best cosine + w * the decoder's pseudo-log-likelihood
  of it given the vector (each token scored with it masked, summed, nats). This one stage may
  return a text a little less close than the closest, when the decoder finds it far more likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.evaluate.sgdd_decode import (
    cosine_of,
    cosine_to,
    decode_rows,
    device_of,
    masked_predictions,
    refill,
    token_logprobs,
    writable_topk,
)
from difflm.models.layers import padding_bias
from difflm.pretrained import Pretrained

GAIN = 1e-6  # an edit must raise the cosine by more than this (the encoder's batch-to-batch noise)
SURE = 0.9  # edit search tries no substitutions where the decoder gives the current token this much
FLUENCY_POOL = 32  # the closest texts of a sentence's search that the fluency stage chooses among


@dataclass
class Verification:
    """How hard decoding works for the target vector (1 candidate, 0 rounds = plain decoding)."""

    candidates: int = 1  # N: decoded per vector, and variants per correction round
    rounds: int = 0  # R: correction rounds after best-of-N
    remask: float = 0.25  # share of the hypothesis re-masked per round (at least one token)
    length_topk: int = 3  # greedy candidates at the length head's top-k lengths (at most N)
    temperature: float = 0.7  # of the candidates beyond the greedy ones
    search: int = 0  # S: edit-search rounds at most, after the correction rounds
    search_k: int = 4  # tokens the decoder proposes per position (substitutions; per gap, insertions: k / 2)
    width: int = 1  # texts expanded per sentence per search round
    patience: int = 3  # search rounds without a closer text before a sentence stops (1: greedy)
    fluency: float = 0.0  # w: weight of the decoder's pseudo-log-likelihood in the search's answer (0: off)

    def __post_init__(self) -> None:
        counts = (self.candidates, self.length_topk, self.search_k, self.width, self.patience)
        if min(counts) < 1 or min(self.rounds, self.search) < 0:
            raise DifflmError(
                "verification needs candidates, length_topk, search_k, width, patience >= 1 and rounds, "
                f"search >= 0; got {counts[:3]}, {self.width}, {self.patience}, {self.rounds}, {self.search}"
            )
        if not (math.isfinite(self.fluency) and self.fluency >= 0):
            raise DifflmError(f"fluency weight must be a finite number >= 0 (0 = off), got {self.fluency}")
        if self.fluency and not self.search:
            raise DifflmError("the fluency weight chooses among the edit search's texts: add search rounds (--search S)")
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
    """Decode vectors [B, D] with best-of-N, `settings.rounds` correction rounds, then up to
    `settings.search` edit-search rounds (which keep the `lengths` when given), and answer with
    `settings.fluency`.

    The target of every comparison is the vector itself (the encoder's vector of the source)."""
    state = verified_search(pre, encoder, vectors, settings, cfg_scale=cfg_scale, generator=generator, lengths=lengths)
    return answer(pre, vectors, state, settings.fluency)


@torch.no_grad()
def verified_search(
    pre: Pretrained,
    encoder,
    vectors: Tensor,
    settings: Verification,
    *,
    cfg_scale: float,
    generator: torch.Generator | None = None,
    lengths: Tensor | None = None,
) -> SearchState:
    """Everything `verified_decode` does before its answer: every text scored per vector (without
    search, the one hypothesis best-of-N and the rounds kept). `answer` then chooses; one search
    serves several fluency weights, which only choose among its texts (settings.fluency is unused)."""
    if cfg_scale < 0:
        raise DifflmError(f"CFG scale must be >= 0 (0 = no guidance), got {cfg_scale}")
    best = best_of_n(pre, encoder, vectors, settings, cfg_scale, generator, lengths)
    for _ in range(settings.rounds):
        best = correction_round(pre, encoder, vectors, best, settings, cfg_scale, generator)
    state = SearchState.start(best)
    edit_search(pre, encoder, vectors, state, settings, lengths is None)
    return state


@torch.no_grad()
def answer(pre: Pretrained, vectors: Tensor, state: SearchState, fluency: float, pool: Pool | None = None) -> Hypotheses:
    """Per vector, the closest text the search scored, or with `fluency` > 0 the fluency stage's
    choice among the closest (`pool`, scored once by `fluency_pool` and shared between weights)."""
    if not fluency:
        found = [state.best(row) for row in range(len(vectors))]
    else:
        found = (pool if pool is not None else fluency_pool(pre, vectors, state)).choose(fluency)
    return from_texts(found, pre.tokenizer.pad_token_id)


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


@dataclass
class SearchState:
    """Edit search per sentence: every text scored so far (token tuple -> cosine), the texts already
    expanded, and the rounds since the closest one last moved closer."""

    scored: list[dict[tuple[int, ...], float]]
    expanded: list[set[tuple[int, ...]]]
    stall: list[int]

    @classmethod
    def start(cls, hypotheses: Hypotheses) -> SearchState:
        seqs, cosine = hypotheses.as_lists(), hypotheses.cosine.tolist()
        return cls([{tuple(s): c} for s, c in zip(seqs, cosine, strict=True)], [set() for _ in seqs], [0] * len(seqs))

    def best(self, row: int) -> tuple[float, list[int]]:
        seq, cos = max(self.scored[row].items(), key=lambda item: item[1])
        return cos, list(seq)

    def frontier(self, row: int, width: int) -> list[tuple[int, ...]]:
        """The `width` closest texts of the row not expanded yet."""
        fresh = [(c, s) for s, c in self.scored[row].items() if s not in self.expanded[row]]
        return [s for _, s in sorted(fresh, reverse=True)[:width]]


def edit_search(
    pre: Pretrained, encoder, vectors: Tensor, state: SearchState, settings: Verification, resize: bool = True
) -> None:
    """Best-first edit search on `state`, `settings.search` rounds at most; a sentence stops after
    `settings.patience` rounds without a closer text (or when nothing is left to expand)."""
    active = torch.ones(len(vectors), dtype=torch.bool)
    for _ in range(settings.search):
        if not active.any():
            break
        active = search_round(pre, encoder, vectors, state, active, settings, resize)


@dataclass
class Pool:
    """Per sentence, the closest texts its search scored (closest first), each with its cosine and
    the decoder's pseudo-log-likelihood of it given the vector: all the fluency stage chooses among."""

    texts: list[list[list[int]]]
    cosines: list[list[float]]
    plls: list[list[float]]

    def choose(self, weight: float, size: int | None = None) -> list[tuple[float, list[int]]]:
        """Per sentence, (cosine, text) of the one of its `size` closest (all when None) with the
        highest cosine + weight * pseudo-log-likelihood (the first such on a tie)."""
        found = []
        for texts, cosines, plls in zip(self.texts, self.cosines, self.plls, strict=True):
            n = len(texts) if size is None else min(size, len(texts))
            best = max(range(n), key=lambda i: (cosines[i] + weight * plls[i], -i))
            found.append((cosines[best], texts[best]))
        return found


def fluency_pool(pre: Pretrained, vectors: Tensor, state: SearchState, size: int = FLUENCY_POOL, chunk: int = 128) -> Pool:
    """The `size` closest texts of every sentence's search, their pseudo-log-likelihoods given the
    vector (`token_logprobs` summed, nats) scored `chunk` texts at a time."""
    ranked = [sorted(scored.items(), key=lambda item: -item[1])[:size] for scored in state.scored]
    owners = [row for row, found in enumerate(ranked) for _ in found]
    texts = [list(seq) for found in ranked for seq, _ in found]
    plls: list[float] = []
    for start in range(0, len(texts), chunk):
        ids, lengths = pad_texts(texts[start : start + chunk], pre.tokenizer.pad_token_id)
        real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # [M, W]
        logp = token_logprobs(pre, vectors[owners[start : start + chunk]], ids, real)  # [M, W], +inf at pads
        plls += logp.masked_fill(~real, 0.0).sum(1).tolist()
    scores = iter(plls)
    return Pool(
        [[list(seq) for seq, _ in found] for found in ranked],
        [[cos for _, cos in found] for found in ranked],
        [[next(scores) for _ in found] for found in ranked],
    )


def search_round(
    pre: Pretrained,
    encoder,
    vectors: Tensor,
    state: SearchState,
    active: Tensor,
    settings: Verification,
    resize: bool = True,
) -> Tensor:
    """Expand the `settings.width` closest unexpanded texts of every active row [B] (all their single
    edits scored, see `neighbours`); returns the rows still searching."""
    members, owners = [], []
    for row in active.nonzero()[:, 0].tolist():
        for seq in state.frontier(row, settings.width):
            state.expanded[row].add(seq)
            members.append(list(seq))
            owners.append(row)
    still = torch.zeros_like(active)
    if not members:
        return still
    rows = sorted(set(owners))
    before = {row: state.best(row)[0] for row in rows}
    baseline = torch.tensor([state.scored[row][tuple(seq)] for row, seq in zip(owners, members, strict=True)])
    for m, seq, cos in neighbours(pre, encoder, vectors[torch.tensor(owners)], members, baseline, settings.search_k, resize):
        state.scored[owners[m]].setdefault(tuple(seq), cos)
    for row in rows:
        closer = state.best(row)[0] > before[row] + GAIN
        state.stall[row] = 0 if closer else state.stall[row] + 1
        still[row] = state.stall[row] < settings.patience and bool(state.frontier(row, 1))
    return still


def neighbours(
    pre: Pretrained, encoder, vectors: Tensor, seqs: list[list[int]], cosine: Tensor, k: int, resize: bool
) -> list[tuple[int, list[int], float]]:
    """Every single edit of each text (vector [M, D], its cosine [M]) scored by the encoder, as
    (text index, edited text, cosine); plus, per text with improving substitutions at several
    positions, all of them applied together. No insertions or deletions unless `resize`."""
    ids, lengths = pad_texts(seqs, pre.tokenizer.pad_token_id)
    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # [M, W]
    logp, subs = masked_predictions(pre, vectors, ids, real, k)  # [M, W], [M, W, k]
    sure = logp > math.log(SURE)  # [M, W]: positions not worth a substitution
    inserts = insertion_proposals(pre, vectors, seqs, max(1, k // 2)) if resize else [None] * len(seqs)
    edits, owner, swaps = [], [], []  # edited texts, their text, (position, token) for substitutions
    for m, seq in enumerate(seqs):
        options = [[] if sure[m, i] else subs[m, i].tolist() for i in range(len(seq))]
        for edit, swap in single_edits(seq, options, inserts[m]):
            edits.append(edit)
            owner.append(m)
            swaps.append(swap)
    if not edits:
        return []
    cos = cosine_of(encoder, pre, edits, vectors[torch.tensor(owner)])  # [E]
    out = list(zip(owner, edits, cos.tolist(), strict=True))
    merged = merge_substitutions(seqs, owner, swaps, cos, cosine)
    if merged:
        idx = list(merged)
        merged_cos = cosine_of(encoder, pre, [merged[m] for m in idx], vectors[torch.tensor(idx)])
        out += [(m, merged[m], c) for m, c in zip(idx, merged_cos.tolist(), strict=True)]
    return out


def single_edits(
    seq: list[int], substitutes: list[list[int]], inserts: list[list[int]] | None
) -> list[tuple[list[int], tuple[int, int] | None]]:
    """Every edit of `seq` one step away, with (position, token) for substitutions, else None:
    substitutions by `substitutes` [n][k], swaps of unequal neighbours, and unless `inserts` is
    None (the length is fixed) deletions (if n > 1) and insertions of `inserts` [gap][k]."""
    n = len(seq)
    out: list[tuple[list[int], tuple[int, int] | None]] = [
        (seq[:i] + [token] + seq[i + 1 :], (i, token)) for i in range(n) for token in substitutes[i]
    ]
    out += [(seq[:i] + [seq[i + 1], seq[i]] + seq[i + 2 :], None) for i in range(n - 1) if seq[i] != seq[i + 1]]
    if inserts is not None:
        out += [(seq[:i] + seq[i + 1 :], None) for i in range(n if n > 1 else 0)]
        out += [(seq[:gap] + [token] + seq[gap:], None) for gap, options in enumerate(inserts) for token in options]
    return out


def merge_substitutions(
    seqs: list[list[int]], owner: list[int], swaps: list, cos: Tensor, baseline: Tensor
) -> dict[int, list[int]]:
    """Per row with improving substitutions at two or more positions: the text with the best one
    at each of those positions applied together."""
    gains: dict[int, dict[int, tuple[float, int]]] = {}
    for e, swap in enumerate(swaps):
        a = owner[e]
        if swap is None or cos[e] <= baseline[a] + GAIN:
            continue
        i, token = swap
        if cos[e].item() > gains.setdefault(a, {}).get(i, (-2.0, 0))[0]:
            gains[a][i] = (cos[e].item(), token)
    merged = {}
    for a, by_position in gains.items():
        if len(by_position) > 1:
            seq = list(seqs[a])
            for i, (_, token) in by_position.items():
                seq[i] = token
            merged[a] = seq
    return merged


@torch.no_grad()
def insertion_proposals(pre: Pretrained, vectors: Tensor, seqs: list[list[int]], k: int) -> list[list[list[int]]]:
    """Per row, per gap 0..n (none when the row is already max_length long): the decoder's k most
    likely tokens for a [MASK] inserted there, given the rest and the vector."""
    mask, pad = pre.tokenizer.mask_token_id, pre.tokenizer.pad_token_id
    longest = pre.model.max_length
    probes = [(a, gap) for a, seq in enumerate(seqs) if len(seq) < longest for gap in range(len(seq) + 1)]
    out: list[list[list[int]]] = [[] for _ in seqs]
    if not probes:
        return out
    ids, lengths = pad_texts([seqs[a][:gap] + [mask] + seqs[a][gap:] for a, gap in probes], pad)
    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # [P, W]
    at = ids == mask  # [P, W], one true per row
    owners = torch.tensor([a for a, _ in probes])
    device = device_of(pre)
    tops = []
    for start in range(0, len(probes), 256):
        part = slice(start, start + 256)
        scores = pre.model(
            ids[part].to(device),
            attention_bias=padding_bias(real[part].to(device)),
            cond=vectors[owners[part]].to(device),
            logits_at=at[part].to(device),
        ).float().cpu()  # [P', V]
        tops.append(writable_topk(pre, scores, k))
    for (a, _), top in zip(probes, torch.cat(tops).tolist(), strict=True):
        out[a].append(top)
    return out


def from_texts(found: list[tuple[float, list[int]]], pad: int) -> Hypotheses:
    """Hypotheses of (cosine, token list) pairs."""
    return Hypotheses(*pad_texts([seq for _, seq in found], pad), torch.tensor([c for c, _ in found]))


def pad_texts(seqs: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token lists as ids [M, longest] padded with `pad`, and their lengths [M]."""
    lengths = torch.tensor([len(seq) for seq in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    return ids, lengths
