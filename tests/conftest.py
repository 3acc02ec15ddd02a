"""Shared test fixtures: a tiny deterministic mock denoiser for sampler tests.

Tests never reach a model hub: offline mode makes a hub name fail at once instead of after retries
(subprocesses started by tests inherit it).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class MockDenoiser(nn.Module):
    """A fixed random function of the input ids that follows the denoiser protocol.

    logits_i = (h_i + tanh(sum_j w[i - j] h_j)) @ head, h = embedding, over the keys j visible
    under attention_bias. The mixing depends only on relative position, so left padding does not
    change the logits of real positions (like RoPE). Computed in float64 so batch composition
    cannot flip an argmax. `cond` [B, V] (optional) is added to the logits, `None` = unconditional.
    """

    supports_kv_cache = False
    supports_logits_at = False
    logits_shift = 0

    def __init__(self, vocab: int = 32, dim: int = 16, max_len: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.rel = nn.Parameter(torch.randn(2 * max_len + 1, generator=g, dtype=torch.float64) / 3)
        self.head = nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64) / 2)
        self.max_len = max_len
        self.mask_token_id = vocab - 1
        self.calls: list[Tensor] = []  # input ids of every forward

    @property
    def max_length(self) -> int:
        return self.max_len

    def forward(
        self, input_ids: Tensor, attention_bias: Tensor | None = None, cond: Tensor | None = None, **_
    ) -> Tensor:
        self.calls.append(input_ids.clone())
        B, L = input_ids.shape
        h = self.emb[input_ids]  # [B, L, D]
        pos = torch.arange(L)
        w = self.rel[pos[:, None] - pos[None, :] + self.max_len].expand(B, L, L)  # [B, L, L]
        if attention_bias is not None:
            w = w * torch.isfinite(attention_bias).expand(B, 1, L, L)[:, 0]
        logits = (h + torch.tanh(w @ h)) @ self.head  # [B, L, V]
        if cond is not None:
            logits = logits + cond[:, None, :]
        return logits.float()


@pytest.fixture
def mock_denoiser():
    """Factory: mock_denoiser(vocab=32, seed=0) -> MockDenoiser (mask id = vocab - 1)."""
    return MockDenoiser
