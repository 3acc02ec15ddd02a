"""What a conditioned decoder computes from its conditioning alone, kept for a whole decode.

An SGDD decode runs up to 16 forwards on the same sentence vector. At each of them the decoder
recomputed products of that vector that never change between steps: its AdaLN projection, the
keys and values of its memory tokens in every cross-attention, and the AdaLN modulations, which
also depend on t, but t (the masked share of a row of n tokens) only takes the values k / n. At
batch 1 these are matrix-vector products, bound by reading their weights: on this project's CPU
nearly a third of the lightweight SGDD decoder's matmul time. `precompute` computes them once for
a set of conditioning rows and a grid of t values; a forward then picks its rows (`rows`, indices
into the set) and its t from the grid. The picked values equal the recomputed ones up to float
rounding (one batched matmul instead of one per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflm.errors import DifflmError
from difflm.models.layers import AdaLNModulation, CrossAttention


@dataclass
class Conditioning:
    """Per-row, per-t conditioning products of a conditioned decoder (`precompute`)."""

    t_grid: Tensor | None  # [G] the t values of the tables; None: the model ignores t (G = 1)
    modulations: list[Tensor]  # per block: AdaLN outputs before chunking [R, G, chunks * C]
    chunks: int  # vectors per block's modulation (shift, scale[, gate] ...)
    final: Tensor | None  # the final norm's modulation [R, G, 2C], if the model has one
    memory_kv: list[tuple[Tensor, Tensor]] | None  # per block: cross-attention k, v [R, H, T, D]

    @property
    def rows(self) -> int:
        return self.modulations[0].shape[0]

    def pick(self, rows: Tensor, t: Tensor | None) -> Picked:
        """The products of conditioning rows `rows` [B] at times t [B] (None = 0)."""
        if rows.dim() != 1 or int(rows.min()) < 0 or int(rows.max()) >= self.rows:
            raise DifflmError(f"conditioning rows must be indices in [0, {self.rows}), got {rows.tolist()}")
        if self.t_grid is None:
            at = torch.zeros_like(rows)
        else:
            t = torch.zeros(len(rows), device=rows.device) if t is None else t.reshape(-1).expand(len(rows))
            hit = t[:, None] == self.t_grid[None, :]  # [B, G]
            if not bool(hit.any(1).all()):
                raise DifflmError(
                    f"t {t.tolist()} is not on the precomputed conditioning's grid: give `precompute` "
                    "every t the forwards use"
                )
            at = hit.int().argmax(1)  # [B]
        flat = rows * (1 if self.t_grid is None else len(self.t_grid)) + at  # [B] into [R * G]

        def rows_at(table: Tensor) -> Tensor:  # [R, G, X] -> [B, X]: one gather per table
            return table.flatten(0, 1).index_select(0, flat)

        return Picked(
            [rows_at(m).chunk(self.chunks, dim=-1) for m in self.modulations],
            None if self.final is None else rows_at(self.final).chunk(2, dim=-1),
            None if self.memory_kv is None else [(k[rows], v[rows]) for k, v in self.memory_kv],
        )


@dataclass
class Picked:
    """One forward's share of a `Conditioning`: [B, C] chunks and [B, H, T, D] keys/values."""

    modulations: list[tuple[Tensor, ...]]  # per block: its modulation's chunks
    final: tuple[Tensor, ...] | None  # shift, scale
    memory_kv: list[tuple[Tensor, Tensor]] | None


def precompute(
    c_sem: Tensor,
    time_embedding: Callable[[Tensor], Tensor] | None,
    t_grid: Tensor | None,
    modulations: Sequence[AdaLNModulation],
    final: AdaLNModulation | None = None,
    memory: Tensor | None = None,
    crosses: Sequence[CrossAttention] = (),
) -> Conditioning:
    """A decoder's conditioning products for R rows: c_sem [R, C] their AdaLN projection,
    time_embedding t [G] -> [G, C] (None: no time conditioning), each block's modulation, the final
    norm's, and the memory tokens [R, T, C] with the cross-attentions that read them."""
    c = c_sem[:, None]  # [R, 1, C]
    grid = None
    if time_embedding is not None:
        grid = torch.zeros(1, device=c.device) if t_grid is None else t_grid.reshape(-1).to(c.device)
        c = c + time_embedding(grid)[None]  # [R, G, C]
    return Conditioning(
        grid,
        [m.packed(c) for m in modulations],
        modulations[0].n_chunks,
        None if final is None else final.packed(c),
        None if memory is None else [cross.keys_values(memory) for cross in crosses],
    )


def pick(
    conditioning: Conditioning | None, rows: Tensor | None, t: Tensor | None, batch: int
) -> Picked | None:
    """A forward's share of its precomputed conditioning (rows [batch] at t), or None without one."""
    if conditioning is None:
        return None
    if rows is None or rows.shape != (batch,):
        raise DifflmError(f"conditioning needs cond_rows: one index per row of the batch ({batch})")
    return conditioning.pick(rows, t)
