"""Tests for difflm.models.transformer and difflm.models.layers (tiny CPU configs)."""

from __future__ import annotations

import pytest
import torch

from difflm.errors import DifflmError
from difflm.models import transformer as transformer_module
from difflm.models.layers import (
    AdaLNModulation,
    AttentionContext,
    KVCache,
    causal_bias,
    combine_bias,
    padding_bias,
    rope_cos_sin,
)
from difflm.models.transformer import Transformer, TransformerConfig

V, L, C = 64, 16, 32
INF = float("-inf")


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=C, mask_token_id=V - 1)
    kw.update(overrides)
    return Transformer(TransformerConfig(**kw)).eval()


def ids(batch: int = 2, length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def block_causal(length: int, block: int) -> torch.Tensor:
    """Queries in block b see keys in blocks <= b: [1, 1, L, L]."""
    blk = torch.arange(length) // block
    visible = blk[None, :] <= blk[:, None]
    return torch.zeros(length, length).masked_fill(~visible, INF)[None, None]


def perturb_modulation(model: Transformer) -> None:
    """Stand-in for training: give the zero-initialised AdaLN layers non-zero weights."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaLNModulation):
                module.proj.weight.copy_(0.3 * torch.randn(module.proj.weight.shape, generator=gen))


# --- bias helpers ---------------------------------------------------------------------------


def test_bias_helpers_hand_values():
    assert torch.equal(padding_bias(torch.tensor([[1, 1, 0]])), torch.tensor([[[[0.0, 0.0, INF]]]]))
    expected = torch.tensor([[0.0, INF, INF], [0.0, 0.0, INF], [0.0, 0.0, 0.0]])[None, None]
    assert torch.equal(causal_bias(3), expected)
    assert combine_bias(None, None) is None
    combined = combine_bias(padding_bias(torch.tensor([[1, 0, 1]])), None, causal_bias(3))
    assert torch.equal(
        combined, torch.tensor([[0.0, INF, INF], [0.0, INF, INF], [0.0, INF, 0.0]])[None, None]
    )


# --- shapes, parameters, tying ---------------------------------------------------------------


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_output_shape_and_parameter_count(mlp):
    model = tiny(mlp=mlp)
    assert model(ids()).shape == (2, L, V)
    assert model.mask_token_id == V - 1 and model.config.mlp == mlp
    mlp_params = 2 * C * 4 * C if mlp == "gelu" else 3 * C * 4 * C
    per_block = 3 * C * C + C * C + mlp_params + 2 * C  # qkv, out, mlp, two RMSNorm weights
    expected = V * C + 2 * per_block + C  # embedding (head tied), blocks, final norm
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - V * C


def test_nanogpt_configuration_is_nanogpt():
    """norm=layer, rope=false, learned positions, gelu_exact, causal: GPT-2 / nanoGPT written out."""
    import torch.nn.functional as F

    model = tiny(norm="layer", norm_eps=1e-5, rope=False, learned_positions=True, mlp="gelu_exact",
                 causal=True, bias=True)  # fmt: skip
    x_ids = ids()
    H, D = 2, C // 2
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm weights / biases away from 1 / 0
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x = model.tok_emb.weight[x_ids] + model.pos_emb.weight[:L]
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        for blk in model.blocks:
            h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-5)
            q, k, v = (t.reshape(2, L, H, D).transpose(1, 2) for t in blk.attn.qkv(h).split(C, -1))
            att = ((q @ k.transpose(-1, -2)) / D**0.5).masked_fill(future, INF).softmax(-1)
            x = x + blk.attn.out_proj((att @ v).transpose(1, 2).reshape(2, L, C))
            h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-5)
            x = x + blk.mlp.out_proj(0.5 * blk.mlp.fc(h) * (1 + torch.erf(blk.mlp.fc(h) / 2**0.5)))
        ref = F.layer_norm(x, (C,), model.norm_f.weight, model.norm_f.bias, 1e-5) @ model.tok_emb.weight.T
        torch.testing.assert_close(model(x_ids), ref, atol=1e-5, rtol=1e-5)


def test_tied_head_shares_storage():
    tied = tiny()
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + V * C


# --- attention patterns ----------------------------------------------------------------------


@torch.no_grad()
def test_bidirectional_sees_the_future_and_causal_does_not():
    x = ids()
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % V
    bi, ar = tiny(), tiny(causal=True)
    assert not torch.allclose(bi(x)[:, :10], bi(y)[:, :10])
    assert torch.equal(ar(x)[:, :10], ar(y)[:, :10])
    assert not torch.allclose(ar(x)[:, 10:], ar(y)[:, 10:])


@torch.no_grad()
def test_causal_mode_equals_explicit_causal_bias():
    bi, ar = tiny(), tiny(causal=True)
    ar.load_state_dict(bi.state_dict())
    x = ids()
    torch.testing.assert_close(ar(x), bi(x, attention_bias=causal_bias(L)), atol=1e-6, rtol=0)
    # an extra bias is combined with the automatic causal one
    pad = padding_bias(torch.ones(2, L).index_fill_(1, torch.tensor([3]), 0))
    torch.testing.assert_close(
        ar(x, attention_bias=pad), bi(x, attention_bias=pad + causal_bias(L)), atol=1e-6, rtol=0
    )


@torch.no_grad()
def test_padding_bias_hides_padded_keys():
    model = tiny()
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, 12:] = 0
    mask[1, 9:] = 0
    x, y = ids(seed=1), ids(seed=2)
    y[mask.bool()] = x[mask.bool()]  # same real tokens, different pad tokens
    bias = padding_bias(mask)
    out_x, out_y = model(x, attention_bias=bias), model(y, attention_bias=bias)
    torch.testing.assert_close(out_x[0, :12], out_y[0, :12], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_x[1, :9], out_y[1, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(model(x)[0, :12], model(y)[0, :12])  # without the bias pads leak


@torch.no_grad()
def test_position_offset_without_cache_is_a_rope_shift():
    # RoPE scores depend only on relative positions, so a shifted bidirectional input is unchanged
    model, x = tiny(), ids(length=10)
    torch.testing.assert_close(model(x, position_offset=6), model(x), atol=1e-5, rtol=0)
    cos0, _ = rope_cos_sin(0, 10, C // 2, 10000.0)
    cos6, _ = rope_cos_sin(6, 4, C // 2, 10000.0)
    assert torch.equal(cos6, cos0[6:10])


def test_logits_shift_reads_each_position_from_the_one_before():
    plain, x = tiny(), ids(length=10)
    shifted = tiny(logits_shift=1)  # same seed: same weights
    with torch.no_grad():
        a, b = plain(x), shifted(x)
    torch.testing.assert_close(b[:, 1:], a[:, :-1], atol=0, rtol=0)
    torch.testing.assert_close(b[:, 0], a[:, 0], atol=0, rtol=0)
    with pytest.raises(DifflmError, match="bidirectional"):
        TransformerConfig(vocab_size=V, block_size=16, causal=True, logits_shift=1)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"logits_shift": 1}, {"causal": True}, {"cond_dim": 8, "cond_tokens": 2, "time_conditioning": True}],
    ids=["bidirectional", "shifted", "causal", "conditioned"],
)
def test_logits_at_computes_only_what_it_reads_and_equals_the_full_forward(overrides, monkeypatch):
    """The last block computes only the columns logits_at reads (its keys and values still come
    from every position): the packed logits equal the full forward's, with and without a bias,
    and gradients reach the same weights. It does so only when that saves enough work."""
    model, x = tiny(**overrides), ids(length=10)
    at = torch.zeros(2, 10, dtype=torch.bool)
    at[0, [2, 5]], at[1, [5, 9]] = True, True  # row 0 never reads 9, row 1 never 2
    assert model._output_columns(at, has_bias=True) is None  # 7 rows of a 32-wide block: too little
    monkeypatch.setattr(transformer_module, "SKIP_MIN_FLOPS", 1)
    perturb_modulation(model)
    kw = {"cond": torch.randn(2, 8), "t": torch.tensor([0.3, 0.7])} if "cond_dim" in overrides else {}
    bias = padding_bias(torch.tensor([[1] * 10, [1] * 8 + [0] * 2]))
    for b in (None, bias):
        full, packed = model(x, attention_bias=b, **kw), model(x, attention_bias=b, logits_at=at, **kw)
        torch.testing.assert_close(packed, full[at], atol=1e-5, rtol=1e-5)
    shifted = "logits_shift" in overrides  # row i reads output i - 1 (row 0 its own)
    assert model._output_columns(at, has_bias=True).tolist() == ([1, 4, 8] if shifted else [2, 5, 9])
    everything = model._output_columns(torch.ones(2, 10, dtype=torch.bool), has_bias=True)
    assert everything.tolist() == list(range(9)) if shifted else everything is None  # None: no selection
    model.zero_grad()
    model(x, logits_at=at, **kw).sum().backward()
    pruned = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, **kw)[at].sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(pruned[name], p.grad, atol=1e-5, rtol=1e-4)


# --- KV cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 5])
@torch.no_grad()
def test_autoregressive_decoding_with_cache_matches_full_forward(prefill):
    model, x = tiny(causal=True), ids()
    full = model(x)  # [B, L, V]
    cache = KVCache.for_model(model, batch=2)
    steps = [model(x[:, :prefill], kv_cache=cache)]
    for p in range(prefill, L):
        steps.append(model(x[:, p : p + 1], position_offset=p, kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == L


@torch.no_grad()
def test_blockwise_cache_reuse_bidirectional():
    model, x, s, e = tiny(), ids(), 4, 8
    full = model(x)
    cache = KVCache.for_model(model, batch=2, max_len=L)
    torch.testing.assert_close(model(x, kv_cache=cache), full, atol=1e-5, rtol=0)
    dual = model(x[:, s:e], position_offset=s, kv_cache=cache, attend_len=L)
    torch.testing.assert_close(dual, full[:, s:e], atol=1e-5, rtol=0)


@torch.no_grad()
def test_blockwise_cache_reuse_block_causal():
    model, x, s, e = tiny(), ids(), 4, 8
    bias = block_causal(L, 4)
    full = model(x, attention_bias=bias)
    cache = KVCache.for_model(model, batch=2)
    model(x, attention_bias=bias, kv_cache=cache)
    prefix = model(x[:, s:e], position_offset=s, kv_cache=cache, attend_len=e)
    torch.testing.assert_close(prefix, full[:, s:e], atol=1e-5, rtol=0)
    dual = model(x[:, s:e], attention_bias=bias[:, :, s:e], position_offset=s, kv_cache=cache, attend_len=L)
    torch.testing.assert_close(dual, full[:, s:e], atol=1e-5, rtol=0)


@torch.no_grad()
def test_blockwise_cache_reuse_causal():
    model, x, s, e = tiny(causal=True), ids(), 4, 8
    full = model(x)
    cache = KVCache.for_model(model, batch=2)
    model(x, kv_cache=cache)
    for attend_len in (e, L):
        out = model(x[:, s:e], position_offset=s, kv_cache=cache, attend_len=attend_len)
        torch.testing.assert_close(out, full[:, s:e], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cache_and_position_errors():
    model = tiny()
    cache = KVCache.for_model(model, batch=2, max_len=8)
    with pytest.raises(DifflmError, match="exceeds max_len"):
        model(ids(length=4), position_offset=6, kv_cache=cache)
    assert cache.length == 0 and not cache.k[0].any()  # nothing was written
    with pytest.raises(DifflmError, match="attend_len"):
        model(ids(length=4), kv_cache=cache, attend_len=9)
    with pytest.raises(DifflmError, match="attend_len needs a kv_cache"):
        model(ids(length=4), attend_len=4)
    with pytest.raises(DifflmError, match="batch"):
        model(ids(batch=3, length=4), kv_cache=cache)
    with pytest.raises(DifflmError, match="block_size"):
        model(ids(length=4), position_offset=L - 3)
    with pytest.raises(DifflmError, match="does not match the model"):
        model(ids(length=4), kv_cache=KVCache(3, 2, 2, 8, C // 2))
    with pytest.raises(DifflmError, match="attention_bias"):
        model(ids(length=4), attention_bias=torch.zeros(1, 1, 4, 5))


# --- conditioning ----------------------------------------------------------------------------

COND = dict(time_conditioning=True, cond_dim=8, cond_tokens=2)


@torch.no_grad()
def test_adaln_zero_blocks_start_as_identity_and_ignore_conditioning():
    model = tiny(**COND)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, L, C, generator=gen)
    cos, sin = rope_cos_sin(0, L, C // 2, 10000.0)
    c, memory = torch.randn(2, C, generator=gen), torch.randn(2, 2, C, generator=gen)
    for layer, block in enumerate(model.blocks):
        assert torch.equal(block(h, AttentionContext(cos, sin), layer, c, memory), h)
    x = ids()
    ref = model(x)
    a = model(x, t=torch.tensor([0.1, 0.9]), cond=torch.randn(2, 8, generator=gen))
    b = model(x, t=torch.tensor(0.5), cond=torch.randn(2, 8, generator=gen))
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_null_vector_stands_in_for_missing_cond():
    model = tiny(**COND)
    perturb_modulation(model)
    x, t = ids(), torch.tensor([0.2, 0.7])
    cond = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        uncond = model(x, t=t)
        assert torch.equal(uncond, model(x, t=t, cond=model.null_cond.expand(2, -1)))
        assert not torch.allclose(uncond, model(x, t=t, cond=cond))
        assert not torch.allclose(uncond, model(x, t=torch.tensor([0.5, 0.5])))
        assert torch.equal(model(x, cond=cond), model(x, t=torch.zeros(2), cond=cond))  # t=None is t=0
    model(x, t=t).sum().backward()
    assert model.null_cond.grad is not None and model.null_cond.grad.abs().sum() > 0


def test_precomputed_conditioning_gives_the_same_logits():
    model = tiny(**COND)
    perturb_modulation(model)
    with torch.no_grad():  # the cross-attention's output projection starts at zero too
        for block in model.blocks:
            block.cross_attn.out_proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(3, 8, generator=gen)  # conditioning rows; row 3 below is the null vector
    grid = torch.tensor([0.0, 0.25, 0.5, 1.0])
    fixed = model.conditioning(torch.cat([rows, model.null_cond[None].detach()]), grid)
    x, pick = ids(4), torch.tensor([2, 0, 3, 2])
    t = torch.tensor([0.5, 0.0, 1.0, 0.25])
    with torch.no_grad():
        plain = model(x, t=t, cond=torch.cat([rows, model.null_cond[None]])[pick])
        got = model(x, t=t, cond=torch.zeros(4, 8), conditioning=fixed, cond_rows=pick)  # cond unused
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model(x, t=t, conditioning=fixed, cond_rows=pick.flip(0)))
        with pytest.raises(DifflmError, match="not on the precomputed conditioning's grid"):
            model(x, t=torch.tensor([0.5, 0.3, 1.0, 0.25]), conditioning=fixed, cond_rows=pick)
        with pytest.raises(DifflmError, match="cond_rows"):
            model(x, t=t, conditioning=fixed)
        with pytest.raises(DifflmError, match="conditioning rows"):
            model(x, t=t, conditioning=fixed, cond_rows=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(DifflmError, match="no cond_dim"):
        tiny().conditioning(rows)


@torch.no_grad()
def test_forward_input_errors():
    with pytest.raises(DifflmError, match="cond_dim"):
        tiny()(ids(), cond=torch.zeros(2, 8))
    model = tiny(**COND)
    with pytest.raises(DifflmError, match="cond must be"):
        model(ids(), cond=torch.zeros(2, 7))
    with pytest.raises(DifflmError, match="t must be"):
        model(ids(), t=torch.zeros(3))
    with pytest.raises(DifflmError, match="input_ids"):
        model(torch.zeros(L, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_embd=30, n_head=4),
        dict(n_embd=36, n_head=4),
        dict(mlp="relu"),
        dict(dropout=1.0),
        dict(cond_tokens=2),
        dict(cond_dim=0),
        dict(mask_token_id=V),
        dict(pad_token_id=-1),
        dict(vocab_size=0),
        dict(ffn_hidden=0),
    ],
)
def test_config_validation(overrides):
    kw = dict(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=C)
    kw.update(overrides)
    with pytest.raises(DifflmError):
        TransformerConfig(**kw)


# --- mixed precision -------------------------------------------------------------------------


@torch.no_grad()
def test_autocast_bfloat16():
    model = tiny(mlp="swiglu", **COND)
    perturb_modulation(model)
    x, t = ids(), torch.tensor([0.3, 0.6])
    bias = padding_bias(torch.ones(2, L).index_fill_(1, torch.tensor([15]), 0))
    ref = model(x, attention_bias=bias, t=t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, attention_bias=bias, t=t)
    assert out.dtype == torch.bfloat16 and out.shape == (2, L, V)
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)

    ar = tiny(causal=True)
    cache = KVCache.for_model(ar, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = [ar(x[:, p : p + 1], position_offset=p, kv_cache=cache) for p in range(4)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), ar(x[:, :4]), atol=0.05, rtol=0.05)


@torch.no_grad()
def test_weights_cast_to_bfloat16_take_float32_times_and_vectors():
    """A conditioned model cast to bfloat16 (serve --dtype bfloat16) is fed float32 t and cond."""
    model = tiny(**COND)
    perturb_modulation(model)
    x, t, cond = ids(), torch.tensor([0.3, 0.6]), torch.randn(2, 8)
    ref = model(x, t=t, cond=cond)
    out = model.to(torch.bfloat16)(x, t=t, cond=cond)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("learned", [False, True])
def test_all_mask_input_needs_learned_positions_to_tell_positions_apart(learned):
    """RoPE only sees relative offsets: identical inputs give identical outputs at every position,
    so a decoder that starts from all masks (SGDD) needs absolute positions."""
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16, learned_positions=learned
    )
    with torch.no_grad():
        out = Transformer(cfg).eval()(torch.full((1, 8), 15))[0]  # [8, V]
    spread = float((out - out[0]).abs().max())
    assert (spread > 1e-4) if learned else (spread < 1e-5)


@pytest.mark.parametrize(("start", "rows", "keys"), [(0, 5, 5), (3, 1, 4), (2, 3, 9), (7, 2, 9)])
def test_causal_rows_are_the_rows_of_the_causal_bias(start, rows, keys):
    from difflm.models.layers import causal_bias, causal_rows_bias

    assert torch.equal(causal_rows_bias(start, rows, keys), causal_bias(keys)[:, :, start : start + rows])
