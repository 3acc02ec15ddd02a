"""Block diffusion (BD3-LM): the two-stream training mask, its K = 1 and K = L limits, and exact
block-causal sampling with a KV cache."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from difflm.config import DiffusionConfig
from difflm.errors import DifflmError
from difflm.evaluate.likelihood import any_order_nll, left_to_right_nll
from difflm.models.block_attention import (
    bd3_lookahead_bias,
    bd3_training_bias,
    block_causal_bias,
    lookahead_positions,
)
from difflm.models.layers import causal_bias
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.sampling.cache import BlockForward
from difflm.sampling.unmask import SampleConfig, generate
from difflm.train.objectives import MaskedDiffusionObjective

ROOT = Path(__file__).resolve().parents[1]
V, L = 17, 12
MASK = V - 1


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, mask_token_id=MASK)
    return Transformer(cfg).eval()


def visible(bias: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(bias)[0, 0]


def test_bd3_training_mask_by_hand():
    # L = 4, K = 2: blocks [0, 0, 1, 1]; rows/cols are [noisy 0..3 ; clean 0..3]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: own noisy block, no clean block before it
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: own noisy block + clean block 0
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: clean blocks <= 0, never a noisy key
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks <= 1
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible(bd3_training_bias(4, 2)), expected)
    assert torch.equal(visible(block_causal_bias(4, 2)), expected[4:, 4:])


def task(K: int | None) -> MaskedDiffusionObjective:
    return MaskedDiffusionObjective(DiffusionConfig(block_length=K), mask_token_id=MASK, vocab_size=V)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, V - 1, (3, L), generator=g)}


def test_block_length_L_is_full_masked_diffusion():
    model = tiny()
    prepared = task(L).prepare(batch(), torch.Generator().manual_seed(5))
    assert (
        prepared["inv_weight"].shape == (3, L)
        and (prepared["inv_weight"] == prepared["inv_weight"][:, :1]).all()
    )
    with torch.no_grad():  # one block: the noisy copy sees only itself, as full masked diffusion
        loss_bd3, _ = task(L).loss(model, prepared)
        loss_mdm, _ = task(None).loss(model, prepared)
    torch.testing.assert_close(loss_bd3, loss_mdm, rtol=1e-5, atol=1e-6)


def test_each_block_draws_its_own_time():
    prepared = task(4).prepare(batch(), torch.Generator().manual_seed(6))
    per_block = prepared["inv_weight"].view(3, 3, 4)  # [B, blocks, K]
    assert (per_block == per_block[..., :1]).all()  # constant within a block
    assert len(per_block[..., 0].unique()) == 9  # one stratum per block


def test_block_length_1_predicts_each_token_from_the_clean_prefix():
    model = tiny(1)
    x0 = batch(1)["input_ids"][:1]  # [1, L]
    noisy = torch.full_like(x0, MASK)
    both = torch.cat([noisy, x0], dim=1)
    with torch.no_grad():
        logits = model(both, attention_bias=bd3_training_bias(L, 1), position_ids=torch.arange(L).repeat(2))
        for i in range(L):  # clean x_<i then the mask at position i, causally: next-token prediction
            ref = model(torch.cat([x0[:, :i], noisy[:, i : i + 1]], dim=1), attention_bias=causal_bias(i + 1))
            torch.testing.assert_close(logits[0, i], ref[0, -1], rtol=1e-4, atol=1e-5)


def test_blocks_never_see_later_blocks_and_clean_never_sees_noisy():
    model, K = tiny(2), 4
    x0 = batch(2)["input_ids"][:1]
    noisy = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)) < 0.5, MASK)
    pos, bias = torch.arange(L).repeat(2), bd3_training_bias(L, K)
    with torch.no_grad():
        base = model(torch.cat([noisy, x0], 1), attention_bias=bias, position_ids=pos)
        later = x0.clone()
        later[:, 8:] = (later[:, 8:] + 1) % (V - 1)  # change the last block, clean copy
        changed = model(torch.cat([noisy, later], 1), attention_bias=bias, position_ids=pos)
        other = noisy.clone()
        other[:, 4:8] = MASK - 1  # change the noisy copy of block 1
        changed_noisy = model(torch.cat([other, x0], 1), attention_bias=bias, position_ids=pos)
    torch.testing.assert_close(changed[:, :L], base[:, :L])  # no noisy block sees clean block 2
    assert not torch.allclose(changed[:, 8 + L :], base[:, 8 + L :])  # (the clean stream does)
    untouched = torch.cat([torch.arange(0, 4), torch.arange(8, 2 * L)])  # every row but noisy block 1
    torch.testing.assert_close(changed_noisy[:, untouched], base[:, untouched])


@pytest.mark.parametrize("shift", [0, 1, "lookahead"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("extra", [{}, {"threshold": 0.3}])
def test_block_causal_cached_sampling_equals_uncached(cache, extra, shift):
    model = tiny(3)
    if shift:  # a shifted head also feeds the final token before each block (or its lookahead row)
        config = dataclasses.replace(model.config, logits_shift=1, lookahead_row=shift == "lookahead")
        model = Transformer(config).eval()
        model.load_state_dict(tiny(3).state_dict())
    prompt = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    base = dict(gen_length=10, steps=10, block_length=4, block_causal=True, **extra)
    plain = generate(model, prompt, SampleConfig(**base), attention_mask=mask)
    fast = generate(model, prompt, SampleConfig(**base, cache=cache), attention_mask=mask)
    assert torch.equal(plain.tokens, fast.tokens)
    assert plain.tokens.shape == (2, 15)  # the alignment padding is dropped again
    assert (plain.tokens[:, 5:] != MASK).all()


def test_block_causal_cache_feeds_each_finished_block_once():
    model = tiny(4)
    seen: list[tuple[int, int]] = []
    forward = model.forward

    def spy(ids, *, position_offset=0, kv_cache=None, attend_len=None, logits_at=None, **kw):
        seen.append((position_offset, ids.shape[1]))
        return forward(
            ids,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
            logits_at=logits_at,
            **kw,
        )

    model.forward = spy
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, block_causal=True, cache="prefix")
    generate(model, torch.tensor([[1, 2, 3, 4]]), cfg)
    # block 1 = [4, 8): refresh over prompt + block (offset 0, 8 slots), then 3 steps of the block;
    # block 2 = [8, 12): refresh over finished block 1 + block 2 (offset 4), then 3 steps
    assert seen == [(0, 8), (4, 4), (4, 4), (4, 4), (4, 8), (8, 4), (8, 4), (8, 4)]


def test_block_causal_prompt_alignment_keeps_training_blocks():
    """A 5-token prompt with K = 4 is left padded to 8, so generation starts where training's
    block 2 starts; the first forward sees exactly the hand-built aligned input and bias."""
    model = tiny(5)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = model.forward

    def spy(ids, *, attention_bias=None, logits_at=None, **kw):
        calls.append((ids.clone(), attention_bias))
        return forward(ids, attention_bias=attention_bias, logits_at=logits_at, **kw)

    model.forward = spy
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    out = generate(model, prompt, SampleConfig(gen_length=3, steps=3, block_length=4, block_causal=True))
    assert torch.equal(out.tokens[:, :5], prompt) and out.tokens.shape == (1, 8)
    x = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, MASK, MASK, MASK]])
    real = torch.tensor([0, 0, 0] + [1] * 8, dtype=torch.bool)
    hand = (
        block_causal_bias(11, 4)
        .masked_fill(~real, float("-inf"))
        .masked_fill(torch.eye(11, dtype=torch.bool), 0)
    )
    ids, bias = calls[0]
    assert torch.equal(ids, x)
    assert torch.equal(torch.isfinite(bias[0, 0]), torch.isfinite(hand[0, 0]))


def test_qwen3_llada_block_diffusion_trains_and_samples_exactly_with_a_cache(tmp_path):
    """BD3 on Qwen3-LLaDA: the K = 1 limit holds for its forward, a recipe trains with
    diffusion.block_length, and its block-causal samples are the same with and without the cache."""
    from difflm.cli import main
    from difflm.pretrained import load_pretrained
    from tests.qwen3_llada_fixtures import pretrain_overrides
    from tests.test_fast_sampling import tiny_qwen3

    model = tiny_qwen3("sdpa")
    x0 = torch.randint(0, 50, (1, 6))
    both = torch.cat([torch.full_like(x0, model.mask_token_id), x0], dim=1)
    with torch.no_grad():
        logits = model(both, attention_bias=bd3_training_bias(6, 1), position_ids=torch.arange(6).repeat(2))
        for i in range(6):
            ref = model(both[:, [*range(6, 6 + i), i]], attention_bias=causal_bias(i + 1))
            torch.testing.assert_close(logits[0, i], ref[0, -1], rtol=1e-4, atol=1e-4)

    overrides = pretrain_overrides(tmp_path, "bd3", "diffusion.block_length=4", "train.max_steps=2")
    assert main(["train", str(ROOT / "recipes/qwen3_llada_pretrain.yaml"), *overrides]) == 0
    pre = load_pretrained(tmp_path / "bd3")
    prompt = torch.tensor([[5, 6, 7]])
    base = dict(gen_length=9, steps=9, block_length=4, block_causal=True)
    plain = generate(pre.model, prompt, SampleConfig(**base))
    cached = generate(pre.model, prompt, SampleConfig(**base, cache="prefix"))
    assert torch.equal(plain.tokens, cached.tokens) and plain.tokens.shape == (1, 12)


def test_shifted_head_with_blocks_of_1_is_the_ar_model():
    """logits_shift=1, K = 1: every noisy token reads the clean copy's output one position back,
    which sees exactly the tokens before it: the same weights' next-token prediction."""
    plain = tiny(2)
    shifted = Transformer(dataclasses.replace(plain.config, logits_shift=1)).eval()
    shifted.load_state_dict(plain.state_dict())
    x0 = batch(1)["input_ids"][:1]  # [1, L]
    everywhere = torch.ones_like(x0, dtype=torch.bool)
    with torch.no_grad():
        logits = task(1)._block_forward(shifted, torch.full_like(x0, MASK), x0, None, everywhere, {})
        for i in range(1, L):  # position i from the clean x_<i, causally
            ref = plain(x0[:, :i], attention_bias=causal_bias(i))
            torch.testing.assert_close(logits[0, i], ref[0, -1], rtol=1e-4, atol=1e-5)


def sampler_view_nll(model: Transformer, x0: torch.Tensor, K: int) -> float:
    """Mean -log p of each token as the block-causal sampler sees it when revealing it left to
    right: the sequence up to its block's end, the token and the rest of its block masked."""
    total = 0.0
    for i in range(L):
        end = min(L, (i // K + 1) * K)
        noisy = x0[:, :end].clone()
        noisy[:, i:end] = MASK
        logits = model(noisy, attention_bias=block_causal_bias(end, K))[:, i].float()
        logits[:, MASK] = float("-inf")  # SUBS, as the sampler bans the mask
        total -= logits.log_softmax(-1).gather(1, x0[:, i : i + 1]).sum().item()
    return total / x0.numel()


@pytest.mark.parametrize("K", [1, 3, 4, L])
@pytest.mark.parametrize("shift", [0, 1])
def test_left_to_right_nll_is_the_samplers_exact_likelihood(K, shift):
    """One forward per offset in a block (all blocks at once, the two-stream mask) gives the same
    likelihood as revealing each token on its own the way the block-causal sampler does."""
    model = Transformer(dataclasses.replace(tiny(3).config, logits_shift=shift)).eval()
    x0 = batch(4)["input_ids"]  # [3, L]
    data = list(x0)
    with torch.no_grad():
        expected = sampler_view_nll(model, x0, K)
    block = None if K == L else K
    got = left_to_right_nll(
        model, data, mask_token_id=MASK, vocab_size=V, block_length=block, batch_size=2, progress=False
    )
    assert got == pytest.approx(expected, rel=1e-5)


def sampler_view_orders(model: Transformer, x0: torch.Tensor, K: int) -> torch.Tensor:
    """log p [K!, B, n_blocks] of each block under each reveal order, one token at a time as the
    block-causal sampler sees it: the clean blocks before, the block with the rest masked."""
    orders = list(itertools.permutations(range(K)))
    out = torch.zeros(len(orders), len(x0), L // K)
    for b, lo in enumerate(range(0, L, K)):
        for o, order in enumerate(orders):
            noisy = x0[:, : lo + K].clone()
            noisy[:, lo:] = MASK
            for i in order:
                logits = model(noisy, attention_bias=block_causal_bias(lo + K, K))[:, lo + i].float()
                logits[:, MASK] = float("-inf")
                out[o, :, b] += logits.log_softmax(-1).gather(1, x0[:, lo + i : lo + i + 1])[:, 0]
                noisy[:, lo + i] = x0[:, lo + i]
    return out


@pytest.mark.parametrize("K", [1, 3, 4])
@pytest.mark.parametrize("shift", [0, 1])
def test_any_order_nll_is_the_mean_over_every_reveal_order(K, shift):
    """2^K forwards (every block at once) and a sum over sets give -log of the mean over the K!
    orders of the sampler's probability of each block: at most the exact ELBO (the mean of the
    logs over orders), equal to it and to the left-to-right NLL for K = 1."""
    model = Transformer(dataclasses.replace(tiny(3).config, logits_shift=shift)).eval()
    x0 = batch(4)["input_ids"]  # [3, L]
    with torch.no_grad():
        for p in (model.tok_emb.weight, *(b.attn.qkv.weight for b in model.blocks)):
            p.mul_(10)  # sharper than the init and context-dependent: the orders' probabilities differ
        log_p = sampler_view_orders(model, x0, K)  # [K!, B, n_blocks]
        got = any_order_nll(
            model, list(x0), mask_token_id=MASK, vocab_size=V, block_length=K, batch_size=2, progress=False
        )
        ltr = left_to_right_nll(
            model, list(x0), mask_token_id=MASK, vocab_size=V, block_length=K, batch_size=2, progress=False
        )
    mixture = -(log_p.logsumexp(0) - math.log(len(log_p))).sum().item() / x0.numel()
    elbo = -log_p.mean(0).sum().item() / x0.numel()
    assert got == pytest.approx(mixture, rel=1e-5)
    if K == 1:
        assert got == pytest.approx(elbo, rel=1e-5) and got == pytest.approx(ltr, rel=1e-5)
    else:
        assert got < elbo - 1e-4  # Jensen, strictly: the orders disagree


def test_any_order_nll_refuses_long_or_missing_blocks():
    for K in (None, 9):
        with pytest.raises(DifflmError, match="needs blocks of 1..8 tokens"):
            any_order_nll(tiny(), [batch()["input_ids"][0]], mask_token_id=MASK, vocab_size=V, block_length=K)


def test_lookahead_mask_by_hand():
    # L = 4, K = 2: rows/cols [noisy 0..3 ; clean 0..3 ; lookahead (position 1, block 1) ; spare]
    v = visible(bd3_lookahead_bias(4, 2))
    assert v.shape == (10, 10)
    assert torch.equal(v[:8, :8], visible(bd3_training_bias(4, 2)))
    assert torch.equal(v[8, :8], v[2, :8])  # the lookahead row sees what block 1's noisy rows see
    assert torch.equal(v[9, :8].nonzero().flatten(), torch.tensor([4, 5]))  # spare: clean block 0
    assert not v[:, 8:].any()  # nothing sees the lookahead or the spare row
    assert torch.equal(lookahead_positions(12, 4), torch.tensor([3, 7]))


def test_lookahead_row_reads_each_block_start_with_the_block_in_view():
    """A shifted model with lookahead rows scores block b's first token from an extra copy of the
    token before it that sees the clean earlier blocks and the noisy block b: the same output as
    that row computed on its own, and unlike the plain shifted model, it depends on the block."""
    torch.manual_seed(3)
    model = Transformer(dataclasses.replace(tiny(3).config, logits_shift=1, lookahead_row=True)).eval()
    x0 = batch(5)["input_ids"][:1]  # [1, L]
    noisy = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, MASK)
    noisy[:, 4] = MASK  # block 1's first token is scored
    everywhere = torch.ones_like(x0, dtype=torch.bool)
    with torch.no_grad():
        logits = task(4)._block_forward(model, noisy, x0, None, everywhere, {})  # [1, L, V]
        for lo in (4, 8):  # by hand: clean blocks before, the noisy block, the lookahead row last
            seq = torch.cat([x0[:, :lo], noisy[:, lo : lo + 4], x0[:, lo - 1 : lo]], dim=1)
            see = torch.ones(lo + 5, lo + 5, dtype=torch.bool)
            see[:, -1] = False  # no row sees the lookahead row
            see[: lo + 4, : lo + 4] = visible(block_causal_bias(lo + 4, 4))
            bias = torch.zeros(see.shape).masked_fill(~see, float("-inf"))[None, None]
            pos = torch.cat([torch.arange(lo + 4), torch.tensor([lo - 1])])
            out = model.lm_head(model.hidden(model.tok_emb(seq), attention_bias=bias, position_ids=pos))
            torch.testing.assert_close(logits[0, lo], out[0, -1], rtol=1e-4, atol=1e-5)
        revealed = noisy.clone()
        revealed[:, 5:8] = x0[:, 5:8]  # reveal the rest of block 1
        again = task(4)._block_forward(model, revealed, x0, None, everywhere, {})
    assert not torch.allclose(again[0, 4], logits[0, 4])  # block 1's first token sees its block
    torch.testing.assert_close(again[0, :4], logits[0, :4])  # block 0 does not see block 1
    torch.testing.assert_close(again[0, 8:], logits[0, 8:])  # block 2 sees only clean block 1


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_lookahead_sampler_reads_the_block_as_training_does(cache):
    """The block-causal sampler's logits for a block (first call, and a later call after more of
    the block is revealed) are the training forward's for the same noisy block."""
    model = Transformer(dataclasses.replace(tiny(3).config, logits_shift=1, lookahead_row=True)).eval()
    x0 = batch(6)["input_ids"][:1]  # [1, L]
    everywhere = torch.ones_like(x0, dtype=torch.bool)
    bias = block_causal_bias(L, 4)
    forward = BlockForward(model, cache, L, block_causal=True)
    with torch.no_grad():
        for lo in (0, 4, 8):
            forward.new_block()
            for revealed in (0, 2):  # first call: the block all masks; then two tokens revealed
                state = x0.clone()
                state[:, lo + revealed :] = MASK  # earlier blocks final, later ones all masks
                noisy = torch.full_like(x0, MASK)
                noisy[:, lo : lo + 4] = state[:, lo : lo + 4]
                expected = task(4)._block_forward(model, noisy, x0, None, everywhere, {})[:, lo : lo + 4]
                got = forward(state, bias, {}, lo, lo + 4)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lookahead_model_refuses_decoding_that_is_not_block_causal():
    model = Transformer(dataclasses.replace(tiny(3).config, logits_shift=1, lookahead_row=True)).eval()
    with pytest.raises(DifflmError, match="block_causal=true"):
        generate(model, torch.tensor([[3, 4, 5, 6]]), SampleConfig(gen_length=8, steps=8, block_length=4))
