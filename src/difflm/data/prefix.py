"""Batches for prefix diffusion with a masked LM: a clean prefix, the rest masked at rate p.

Each batch draws one masking rate p from a small discrete table (1.0, 0.9, ..., 0.1 by default),
then masks every maskable token independently with probability p. The first `prefix_len`
positions are the prompt and stay visible; special tokens ([CLS], [SEP], ...) and padding are
never masked. Labels hold the original id on masked positions and -100 (ignored by
cross-entropy) elsewhere. A batch where nothing was masked (e.g. every sequence no longer than
the prefix) has only -100 labels: the loss must not average over zero targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflm.errors import DifflmError

DEFAULT_RATES = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))  # 1.0, 0.9, ..., 0.1
IGNORE_INDEX = -100


@dataclass
class PrefixCollator:
    """Pad, truncate and mask token-id lists; call as `collator(examples, generator)`."""

    tokenizer_pad_id: int
    mask_token_id: int
    special_ids: Iterable[int]
    prefix_len: int = 16
    rates: Sequence[float] = DEFAULT_RATES
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise DifflmError(f"max length {self.max_length} must be at least 1")
        if self.prefix_len < 0:
            raise DifflmError(f"prefix {self.prefix_len} is negative; use 0 for no prefix")
        if self.prefix_len >= self.max_length:
            relation = "longer than" if self.prefix_len > self.max_length else "as long as"
            raise DifflmError(
                f"prefix {self.prefix_len} is {relation} max length {self.max_length}: nothing is "
                "left to mask; lower prefix_len or raise max_length"
            )
        self.rates = tuple(float(r) for r in self.rates)
        if not self.rates or any(not 0.0 < r <= 1.0 for r in self.rates):
            raise DifflmError(f"mask rates {self.rates} must be non-empty and each in (0, 1], e.g. 0.5")
        self.special_ids = frozenset(int(i) for i in self.special_ids) | {self.tokenizer_pad_id}

    def __call__(self, examples: Sequence[Sequence[int]], generator: torch.Generator) -> dict[str, Tensor]:
        """-> input_ids, attention_mask, labels [B, L] and rate (0-dim float) for the batch."""
        if not examples:
            raise DifflmError("cannot collate an empty batch; check the dataset is not empty")
        clean, attention_mask = self._pad(examples)  # [B, L], [B, L]
        rate = self.rates[int(torch.randint(len(self.rates), (1,), generator=generator))]
        maskable = self._maskable(clean, attention_mask)  # [B, L]
        draws = torch.rand(clean.shape, generator=generator)  # [B, L]
        masked = maskable & (draws < rate)  # [B, L]
        return {
            "input_ids": clean.masked_fill(masked, self.mask_token_id),  # [B, L]
            "attention_mask": attention_mask,  # [B, L]
            "labels": clean.masked_fill(~masked, IGNORE_INDEX),  # [B, L]
            "rate": torch.tensor(rate),
        }

    def _pad(self, examples: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Truncate to max_length and right-pad to the longest example."""
        rows = [list(ex)[: self.max_length] for ex in examples]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer_pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)  # [B, L]
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return ids, attention_mask

    def _maskable(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        special = torch.isin(ids, torch.tensor(sorted(self.special_ids)))  # [B, L]
        after_prefix = torch.arange(ids.shape[1]) >= self.prefix_len  # [L]
        return attention_mask.bool() & ~special & after_prefix  # [B, L]
