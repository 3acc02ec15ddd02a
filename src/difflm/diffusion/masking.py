"""Forward corruption for masked diffusion: which tokens get noised at a given rate, and how.

`corrupt` picks positions (iid per token, or one contiguous span per example) among the positions
the caller did not protect, then replaces them with the mask token or with a random token.
`protected_mask` builds the usual "never corrupt" mask (prefix, prompt, padding, special ids) and
`random_truncate` implements LLaDA's occasional random-length batches. Randomness always comes
from an explicit `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.fields import opt

NOISE_KINDS = ("mask", "random")


@dataclass
class NoiseConfig:
    """How `corrupt` noises tokens."""

    kind: str = opt(
        "mask",
        "'mask': replace with the mask token; 'random': replace with a uniformly random "
        "token that is never the mask token nor an excluded (special) id",
    )
    min_rate: float = opt(
        0.0, "lower bound on the masking rate of every example (rates are clamped up to it)"
    )
    span_prob: float = opt(
        0.0,
        "probability per example of noising one contiguous span of round(rate * eligible) "
        "eligible tokens instead of iid tokens",
    )
    random_length_prob: float = opt(
        0.0, "probability per batch of truncating it to a random length in [1, L] (LLaDA uses 0.01)"
    )

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise DifflmError(f"unknown noise kind {self.kind!r}; choose one of {', '.join(NOISE_KINDS)}")
        for name in ("min_rate", "span_prob", "random_length_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DifflmError(f"noise {name} {value} outside [0, 1]; pass a probability in [0, 1]")


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws made on the generator's device, then moved to `device`."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check_rate(rate: Tensor, shape: tuple[int, int]) -> Tensor:
    """Rate as float32 [B, 1] (one per example) or [B, L] (one per position, e.g. per block);
    a 0-d rate is broadcast. Raises on other shapes and on values outside [0, 1] or NaN."""
    rate = torch.as_tensor(rate, dtype=torch.float32)
    if rate.dim() == 0:
        rate = rate.expand(shape[0])
    if rate.shape == shape[:1]:
        rate = rate[:, None]
    elif rate.shape != shape:
        raise DifflmError(
            f"mask rate shape {tuple(rate.shape)} must be ({shape[0]},) or {shape}: one rate per example or per position"
        )
    bad = ~((rate >= 0.0) & (rate <= 1.0))  # NaN fails both comparisons
    if bad.any():
        value = rate[bad][0].item()
        raise DifflmError(f"mask rate {value} outside [0, 1]; pass rates in [0, 1] (e.g. schedule.rate(t))")
    return rate


def _span_positions(eligible: Tensor, rate: Tensor, generator: torch.Generator) -> Tensor:
    """One contiguous span per example, counted over eligible positions only.

    The span covers k = round(rate * n_eligible) eligible positions starting at a uniform random
    eligible rank; protected positions inside it are skipped (so with a protected prefix and
    padding, the span is contiguous in the sequence).
    """
    n_elig = eligible.sum(dim=1)  # [B]
    k = torch.round(rate * n_elig).long()  # [B]
    u = _uniform((eligible.shape[0],), generator, eligible.device)  # [B]
    start = torch.minimum((u * (n_elig - k + 1)).long(), n_elig - k)  # [B]
    rank = eligible.long().cumsum(dim=1) - 1  # [B, L] rank of each eligible position
    in_span = (rank >= start[:, None]) & (rank < (start + k)[:, None])  # [B, L]
    return eligible & in_span


def _random_tokens(
    shape: tuple[int, ...],
    vocab_size: int,
    banned: Sequence[int],
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """Token ids drawn uniformly from [0, vocab_size) minus `banned`."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    banned_in_vocab = [i for i in banned if 0 <= i < vocab_size]
    allowed[banned_in_vocab] = False
    choices = allowed.nonzero().squeeze(1)  # [V']
    if choices.numel() == 0:
        raise DifflmError(f"no token id left to draw: all {vocab_size} ids are the mask token or excluded")
    idx = torch.randint(choices.numel(), shape, generator=generator, device=generator.device)
    return choices.to(generator.device)[idx].to(device)


def corrupt(
    input_ids: Tensor,
    rate: Tensor,
    *,
    mask_token_id: int,
    cfg: NoiseConfig,
    generator: torch.Generator,
    protected: Tensor | None = None,
    vocab_size: int | None = None,
    exclude_ids: Sequence[int] = (),
) -> tuple[Tensor, Tensor]:
    """Noise `input_ids` [B, L] at `rate` [B] (per example) or [B, L] (per position, as block
    diffusion's per-block times give); returns (noisy_ids, noised), both [B, L].

    `noised` marks the chosen positions (for kind='random' a replacement may equal the original
    token, as in BERT; it is still marked). Positions where `protected` is True are never touched.
    """
    if input_ids.dim() != 2:
        raise DifflmError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    if protected is not None and protected.shape != input_ids.shape:
        raise DifflmError(
            f"protected mask shape {tuple(protected.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    if cfg.kind == "random" and vocab_size is None:
        raise DifflmError("noise kind 'random' needs vocab_size; pass the tokenizer's vocabulary size")
    rate = _check_rate(rate, (batch, length)).to(device).clamp(min=cfg.min_rate)  # [B, 1] or [B, L]
    eligible = torch.ones_like(input_ids, dtype=torch.bool) if protected is None else ~protected.bool()

    noised = eligible & (_uniform((batch, length), generator, device) < rate)  # [B, L]
    if cfg.span_prob > 0:
        if rate.shape[1] != 1:
            raise DifflmError("span noise needs one rate per example; set diffusion.span_prob=0")
        rate = rate[:, 0]
        use_span = _uniform((batch,), generator, device) < cfg.span_prob  # [B]
        noised = torch.where(use_span[:, None], _span_positions(eligible, rate, generator), noised)

    if cfg.kind == "mask":
        replacement = torch.full_like(input_ids, mask_token_id)
    else:
        banned = [mask_token_id, *exclude_ids]
        replacement = _random_tokens((batch, length), vocab_size, banned, generator, device)
    noisy_ids = torch.where(noised, replacement, input_ids)  # [B, L]
    return noisy_ids, noised


def counted_positions(
    eligible: Tensor, u: Tensor, generator: torch.Generator, group: int | None = None
) -> tuple[Tensor, Tensor]:
    """Noise an exact count of each group's eligible tokens: the count form of the masked ELBO.

    Groups are blocks of `group` positions (block diffusion), or whole rows (None). A group with n
    eligible tokens masks m = floor(u * n) + 1 of them (`u` [B, G] in [0, 1): m is uniform on 1..n
    for uniform u), a uniformly random set of that size. Returns (noised [B, L] bool, fraction
    [B, L] float32 = m / n of the position's group, 1 where n = 0).

    Why: integrating the continuous-time ELBO's t out, given m masked of n the weight 1/t averages to
    n/m times the chance of m, so E_t[(1/t) CE] = n E_m[CE / m] with m uniform (Hoogeboom et al.'s
    ARDM). The same bound, with weights in [1, n] instead of 1/t's unbounded ones near t = 0.
    """
    batch, length = eligible.shape
    size = length if group is None else group
    groups = -(-length // size)
    if u.shape != (batch, groups):
        raise DifflmError(f"u shape {tuple(u.shape)} must be ({batch}, {groups}): one draw per group")
    pad = groups * size - length
    grid = torch.nn.functional.pad(eligible, (0, pad)).view(batch, groups, size)  # [B, G, S]
    n = grid.sum(dim=-1)  # [B, G]
    m = torch.minimum((u.to(grid.device) * n).floor().long() + 1, n)  # [B, G]; 0 where n = 0
    scores = _uniform(tuple(grid.shape), generator, grid.device).masked_fill(~grid, 2.0)  # [B, G, S]
    rank = scores.argsort(dim=-1).argsort(dim=-1)  # each position's rank among its group's scores
    noised = grid & (rank < m[..., None])
    fraction = torch.where(n > 0, m / n.clamp(min=1), 1.0).float()  # [B, G]
    fraction = fraction[..., None].expand(batch, groups, size)
    return noised.reshape(batch, -1)[:, :length], fraction.reshape(batch, -1)[:, :length]


def protected_mask(
    input_ids: Tensor,
    *,
    prefix_len: int = 0,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    special_ids: Sequence[int] = (),
) -> Tensor:
    """Bool [B, L], True where tokens must stay clean: the first `prefix_len` positions, each
    example's first `prompt_lengths[b]` positions, padding (attention_mask == 0) and `special_ids`."""
    batch, length = input_ids.shape
    if not 0 <= prefix_len <= length:
        raise DifflmError(f"prefix_len {prefix_len} outside [0, {length}] for sequences of length {length}")
    positions = torch.arange(length, device=input_ids.device)  # [L]
    protected = (positions < prefix_len)[None, :].expand(batch, length).clone()  # [B, L]
    if prompt_lengths is not None:
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        if prompt_lengths.shape != (batch,):
            raise DifflmError(f"prompt_lengths shape {tuple(prompt_lengths.shape)} must be ({batch},)")
        protected |= positions[None, :] < prompt_lengths[:, None]
    if attention_mask is not None:
        protected |= attention_mask == 0
    if len(special_ids) > 0:
        protected |= torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))
    return protected


def random_truncate(
    batch: Tensor | dict[str, Tensor], prob: float, generator: torch.Generator
) -> Tensor | dict[str, Tensor]:
    """With probability `prob`, cut the whole batch to a random length in [1, L] (LLaDA's 1%).

    `batch` is one [B, L, ...] tensor or a dict of them; in a dict, tensors with fewer than two
    dims (e.g. per-example rates) pass through unchanged. Returns the input object when not cut.
    """
    if not 0.0 <= prob <= 1.0:
        raise DifflmError(f"random_length_prob {prob} outside [0, 1]")
    tensors = batch if isinstance(batch, dict) else {"_": batch}
    lengths = {v.shape[1] for v in tensors.values() if isinstance(v, Tensor) and v.dim() >= 2}
    if len(lengths) != 1:
        raise DifflmError(f"random_truncate needs [B, L, ...] tensors sharing one L, got lengths {lengths}")
    full = lengths.pop()
    if torch.rand(1, generator=generator, device=generator.device).item() >= prob:
        return batch
    new_len = int(torch.randint(1, full + 1, (1,), generator=generator, device=generator.device).item())
    cut = {k: v[:, :new_len] if isinstance(v, Tensor) and v.dim() >= 2 else v for k, v in tensors.items()}
    return cut if isinstance(batch, dict) else cut["_"]


def decode_block_view(
    clean: Tensor,
    noisy: Tensor,
    protected: Tensor,
    block: int,
    mask_token_id: int,
    generator: torch.Generator,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The inputs semi-autoregressive decoding in blocks of `block` tokens after a prompt of
    `offset` tokens feeds the model: per row a block drawn uniformly on the grid offset,
    offset + block, ...; the tokens before it clean, the block as `corrupt` noised it, every token
    after it a mask. Returns the new noisy ids [B, L] and the block's positions [B, L] (bool), the
    only ones a loss should score: the decoder never reads the model's outputs elsewhere.
    Protected positions keep their clean token."""
    batch, length = clean.shape
    if not 0 <= offset < length:
        raise DifflmError(
            f"decode offset {offset} must lie in [0, {length}) for sequences of {length} tokens; "
            "set diffusion.decode_offset to the prompt length decoding uses"
        )
    n_blocks = -(-(length - offset) // block)
    index = torch.randint(n_blocks, (batch, 1), generator=generator, device=generator.device)
    start = offset + index.to(clean.device) * block  # [B, 1]
    positions = torch.arange(length, device=clean.device)[None, :]  # [1, L]
    before, after = positions < start, positions >= start + block  # [B, L] each
    out = torch.where(before, clean, noisy)
    out = out.masked_fill(after & ~protected, mask_token_id)
    return out, ~before & ~after
