"""The bfloat16-screened top-k of a vocabulary projection (models/screen.py) picks the exact top-k."""

import gc

import pytest
import torch

from difflm.models import screen
from difflm.models.layers import project


@pytest.fixture
def native(monkeypatch):
    """Screen on any CPU (emulated bfloat16 is slow, not wrong)."""
    monkeypatch.setattr(screen, "_native_bf16", lambda: True)


def exact_top(h, weight, bias, k):
    return project(h, weight, bias).topk(k, dim=-1).indices.sort(-1).values


@torch.no_grad()
@pytest.mark.parametrize("with_bias", [False, True])
def test_screened_top_k_is_the_exact_top_k(native, with_bias):
    g = torch.Generator().manual_seed(0)
    weight, h = torch.randn(4096, 32, generator=g), 3 * torch.randn(6, 32, generator=g)
    bias = torch.randn(4096, generator=g) if with_bias else None
    assert screen._screens(h, weight, 64)
    got = screen.top_tokens(h, weight, bias, 64)
    assert got.shape == (6, 64) and torch.equal(got.sort(-1).values, exact_top(h, weight, bias, 64))


@torch.no_grad()
def test_the_bfloat16_copy_follows_the_weight_and_goes_with_it(native):
    weight, h = torch.randn(2048, 16), torch.randn(3, 16)
    screen.top_tokens(h, weight, None, 8)
    first = screen._copies[id(weight)][1]
    assert screen._bf16(weight) is first  # kept while the weight is unchanged
    weight.mul_(-1.0)  # changed in place, as an optimizer step does
    torch.testing.assert_close(screen._bf16(weight).float(), -first.float())
    assert torch.equal(screen.top_tokens(h, weight, None, 8).sort(-1).values, exact_top(h, weight, None, 8))
    key = id(weight)
    del weight, first
    gc.collect()
    assert key not in screen._copies


def test_no_screen_where_it_cannot_pay_or_could_change_a_gradient(native):
    weight, h = torch.randn(2048, 16), torch.randn(3, 16)
    assert not screen._screens(h, weight, 512)  # keeps most of the vocabulary anyway
    assert not screen._screens(h.double(), weight.double(), 8)
    with torch.enable_grad():
        assert not screen._screens(h, weight, 8)
