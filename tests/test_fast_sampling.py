"""Fast sampling: block-wise KV caches (prefix / dual), threshold and factor parallel decoding."""

import pytest
import torch

from difflm.errors import DifflmError
from difflm.models.layers import padding_bias
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.sampling.cache import BlockForward
from difflm.sampling.draw import factor_count, threshold_count
from difflm.sampling.unmask import SampleConfig, generate

V, MASK, L = 64, 63, 24


def tiny_model(seed: int = 0, logits_shift: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=V,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        mask_token_id=MASK,
        logits_shift=logits_shift,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so confidences spread over (0, 1)
        model.tok_emb.weight.mul_(40)
    return model


class Spy(torch.nn.Module):
    """Wraps a Transformer: records every call and checks refresh passes against a full recompute."""

    supports_kv_cache, supports_logits_at, logits_shift = True, False, 0

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.inner, self.mask_token_id, self.config = model, model.mask_token_id, model.config
        self.max_length = model.max_length
        self.calls: list[dict] = []

    def forward(self, input_ids, *, attention_bias=None, position_offset=0, kv_cache=None, attend_len=None):
        out = self.inner(
            input_ids,
            attention_bias=attention_bias,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
        )
        call = {"offset": position_offset, "width": input_ids.shape[1], "cache": kv_cache, "exact": None}
        if kv_cache is not None and position_offset == 0:  # a refresh pass: compare with no cache
            full = self.inner(input_ids, attention_bias=attention_bias)
            call["exact"] = float((out - full).abs().max())
        self.calls.append(call)
        return out


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 9, 10], [0, 11, 12, 13, 14, 15]])
    mask = (ids != 0).long()
    return ids, mask


def cfg(**kw) -> SampleConfig:
    return SampleConfig(**{"gen_length": 16, "steps": 16, "block_length": 4, **kw})


def test_threshold_one_and_tiny_factor_equal_vanilla():
    model, (ids, mask) = tiny_model(), prompts()
    base = generate(model, ids, cfg(), attention_mask=mask)
    for extra in ({"threshold": 1.0}, {"factor": 1e-12}):
        fast = generate(model, ids, cfg(**extra), attention_mask=mask)
        assert torch.equal(fast.tokens, base.tokens) and fast.forward_passes == base.forward_passes == 16


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_cached_step_on_unchanged_sequence_equals_full_forward(mode, shift):
    """With the cache filled from the same tokens, a cached step is exact (offsets, bias, slots),
    also for a shifted head (the block's first logits come from the position before it)."""
    model = tiny_model(logits_shift=shift)
    x = torch.randint(0, V - 1, (2, L))
    x[:, 12:] = MASK
    bias = padding_bias(torch.tensor([[0] * 3 + [1] * (L - 3), [1] * L]))
    full = model(x, attention_bias=bias)  # [B, L, V]
    fwd = BlockForward(model, mode, L)
    with torch.no_grad():
        first = fwd(x, bias, {}, 12, 16)
        cached = fwd(x, bias, {}, 12, 16)
        fwd.new_block()  # the next block's first call (delayed: it feeds [12, 20))
        next_block = fwd(x, bias, {}, 16, 20)
    torch.testing.assert_close(first, full[:, 12:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, full[:, 12:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(next_block, full[:, 16:20], atol=1e-5, rtol=0)
    assert fwd.caches["cond"].k[0].shape[2] == L and fwd.caches["cond"].length == L


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_first_step_of_each_block_is_exact_and_feeds_the_right_span(mode):
    spy, (ids, mask) = Spy(tiny_model()), prompts()
    result = generate(spy, ids, cfg(cache=mode), attention_mask=mask)
    P = ids.shape[1]
    refresh = [c for c in spy.calls if c["exact"] is not None]
    assert len(refresh) == 4 and all(c["exact"] < 1e-5 for c in refresh)  # one per block
    for c in spy.calls:
        if c["exact"] is None:
            lo = P + 4 * ((c["offset"] - P) // 4)
            assert c["offset"] == lo and c["width"] == (P + 16 - lo if mode == "prefix" else 4)
        assert c["cache"].max_len == P + 16 and c["cache"].length <= P + 16  # never past L
    assert result.forward_passes == 16 == len(spy.calls)


def test_delayed_cache_refreshes_once_then_feeds_the_previous_block_at_each_block_start():
    spy, (ids, mask) = Spy(tiny_model()), prompts()
    result = generate(spy, ids, cfg(cache="delayed"), attention_mask=mask)
    P = ids.shape[1]
    first, *rest = spy.calls
    assert (first["offset"], first["width"]) == (0, P + 16) and first["exact"] < 1e-5  # the one full pass
    spans = [(c["offset"], c["width"]) for c in rest]
    for lo in (P + 4, P + 8, P + 12):  # a block's first step: the previous block and this one
        assert spans.count((lo - 4, 8)) == 1
    assert len(spans) == 15 and all(w == 4 and (o - P) % 4 == 0 for o, w in spans if w != 8)
    assert result.forward_passes == 16


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("extra", [{}, {"threshold": 0.3}])
def test_delayed_cache_is_exact_for_a_one_layer_model(shift, extra):
    """One layer's keys and values depend on their own token and position only; the delayed cache
    rewrites each block once its tokens are final, so every key it holds is current and it decodes
    exactly as without a cache (a second layer's keys read the context: there it approximates)."""
    torch.manual_seed(3)
    config = TransformerConfig(
        vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32, mask_token_id=MASK, logits_shift=shift
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(40)
    ids, mask = prompts()
    base = generate(model, ids, cfg(**extra), attention_mask=mask, trace=True)
    delayed = generate(model, ids, cfg(cache="delayed", **extra), attention_mask=mask, trace=True)
    assert torch.equal(delayed.tokens, base.tokens) and delayed.forward_passes == base.forward_passes
    for ours, theirs in zip(delayed.trace.steps, base.trace.steps, strict=True):  # the same probabilities
        torch.testing.assert_close(ours.confidence, theirs.confidence, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_cache_sampling_is_deterministic_and_first_reveal_matches_vanilla(mode):
    model, (ids, mask) = tiny_model(), prompts()
    vanilla = generate(model, ids, cfg(), attention_mask=mask, trace=True)
    a = generate(model, ids, cfg(cache=mode), attention_mask=mask, trace=True)
    b = generate(model, ids, cfg(cache=mode), attention_mask=mask)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.trace.steps[0].tokens, vanilla.trace.steps[0].tokens)  # step 1 of block 1 is exact


@pytest.mark.parametrize("mode", ["none", "dual", "delayed"])
def test_threshold_with_cache_needs_fewer_passes(mode):
    model, (ids, mask) = tiny_model(), prompts()
    fast = generate(model, ids, cfg(cache=mode, threshold=0.3), attention_mask=mask)
    assert 4 <= fast.forward_passes < 16 and not (fast.tokens == MASK).any()


@pytest.mark.parametrize(
    "extra",
    [
        {"cache": "dual", "threshold": 0.5},
        {"cache": "prefix", "factor": 1.0},
        {"cache": "delayed", "threshold": 0.5},
    ],
)
def test_batched_fast_decoding_equals_per_row(extra):
    model, (ids, mask) = tiny_model(), prompts()
    config = cfg(temperature=1.0, **extra)
    gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
    batch = generate(model, ids, config, attention_mask=mask, generator=gens)
    for r in range(3):
        real = ids[r][mask[r].bool()][None]
        solo = generate(model, real, config, generator=torch.Generator().manual_seed(10 + r))
        assert torch.equal(batch.tokens[r, -16:], solo.tokens[0, -16:]), r


@pytest.mark.parametrize(
    "extra", [{"cache": "prefix", "block_causal": True}, {"cache": "dual"}, {"cache": "delayed"}]
)
def test_rows_at_different_stages_feed_every_row_and_equal_per_row(extra):
    """Threshold decoding lets rows finish a block at different steps; the waiting rows then ride
    along in the block's window (no copy of the active rows' cache), and nothing changes."""
    model, (ids, mask) = tiny_model(), prompts()
    widths: list[int] = []
    forward = model.forward

    def spy(input_ids, **kw):
        widths.append(len(input_ids))
        return forward(input_ids, **kw)

    config = cfg(temperature=1.0, threshold=0.3, **extra)
    model.forward = spy
    gens = [torch.Generator().manual_seed(r) for r in range(3)]
    batch = generate(model, ids, config, attention_mask=mask, generator=gens)
    solo_passes = set()
    for r in range(3):
        real = ids[r][mask[r].bool()][None]
        solo = generate(model, real, config, generator=torch.Generator().manual_seed(r))
        assert torch.equal(batch.tokens[r, -16:], solo.tokens[0, -16:]), r
        solo_passes.add(solo.forward_passes)
    assert len(solo_passes) > 1  # the rows did reach the ends of blocks at different steps
    assert widths[: batch.forward_passes] == [3] * batch.forward_passes


def test_cfg_with_cache_equals_cfg_without_on_first_step():
    model, (ids, mask) = tiny_model(), prompts()
    config = SampleConfig(gen_length=4, steps=1, cfg_scale=1.5)
    plain = generate(model, ids, config, attention_mask=mask)
    cached = generate(
        model, ids, SampleConfig(gen_length=4, steps=1, cfg_scale=1.5, cache="dual"), attention_mask=mask
    )
    assert torch.equal(plain.tokens, cached.tokens) and cached.forward_passes == 1


def test_threshold_and_factor_counts_hand_values():
    conf = torch.tensor([[0.99, 0.2, 0.95, 0.9], [0.5, 0.97, 0.96, 0.1]])
    cand = torch.tensor([[True, True, True, True], [True, True, False, True]])
    assert threshold_count(conf, cand, 0.9).tolist() == [3, 1]
    # row 0 sorted 0.99, 0.95, 0.9, 0.2: (n+1)(1-c) = 0.02, 0.15, 0.4, 4.0 -> n = 3 under factor 1
    # row 1 candidates 0.97, 0.5, 0.1: 0.06, 1.5 -> n = 1
    assert factor_count(conf, cand, 1.0).tolist() == [3, 1]
    assert factor_count(conf, cand, 0.01).tolist() == [0, 0]
    # left to right: the leading run of sure candidates only (non-candidates skipped)
    assert threshold_count(conf, cand, 0.9, prefix=True).tolist() == [1, 0]
    gap = torch.tensor([[0.95, 0.3, 0.92, 0.1]])
    assert threshold_count(gap, torch.tensor([[True, False, True, True]]), 0.9, prefix=True).tolist() == [2]


class SurePositions(torch.nn.Module):
    """Every masked position predicts token 0; sure (probability ~1) at `sure` positions, unsure
    (uniform) elsewhere: which positions a threshold step reveals is set by hand."""

    supports_kv_cache, supports_logits_at, logits_shift = False, False, 0
    mask_token_id, max_length = 7, 64

    def __init__(self, sure: set[int]) -> None:
        super().__init__()
        self.sure = sure

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, 8)
        logits[:, sorted(self.sure), 0] = 50.0
        return logits


@pytest.mark.parametrize(("sure", "passes"), [({5, 7}, 4), ({4, 5, 7}, 3), ({4, 5, 6, 7}, 1)])
def test_left_to_right_threshold_reveals_only_a_sure_leading_run(sure, passes):
    """Prompt of 4, one block of 4 (positions 4..7), Fast-dLLM's steps=0: a step reveals the leftmost
    mask, then the masks after it only while each is sure, never an unsure one after a sure one."""
    config = SampleConfig(gen_length=4, steps=0, threshold=0.9, remasking="left_to_right", block_length=4)
    result = generate(SurePositions(sure), torch.tensor([[1, 2, 3, 4]]), config)
    assert result.forward_passes == passes and torch.equal(
        result.tokens[0, 4:], torch.zeros(4, dtype=torch.long)
    )


def test_cache_errors(mock_denoiser):
    with pytest.raises(DifflmError, match="cache=dual needs a model"):
        generate(mock_denoiser(), torch.tensor([[1, 2]]), cfg(cache="dual"))
    with pytest.raises(DifflmError, match="sample.cache must be one of"):
        cfg(cache="full")
    with pytest.raises(DifflmError, match="sample.factor must be > 0"):
        cfg(factor=0.0)


def tiny_qwen3(attn: str):
    from difflm.models.qwen3_llada import Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM, as_denoiser
    from tests.test_qwen3_llada import TINY

    torch.manual_seed(0)
    config = Qwen3LLaDAConfig(**TINY, mask_token_id=MASK, attn_implementation=attn)
    model = as_denoiser(Qwen3LLaDAForMaskedLM(config).eval())
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_qwen3_llada_cached_step_equals_full_forward(attn, mode):
    """Qwen3-LLaDA's slot cache (GQA: 2 key/value heads for 4 query heads) is exact on an unchanged
    sequence, with left padding, and holds exactly L slots."""
    model = tiny_qwen3(attn)
    x = torch.randint(0, V - 1, (2, L))
    x[:, 12:] = MASK
    bias = padding_bias(torch.tensor([[0] * 3 + [1] * (L - 3), [1] * L]))
    with torch.no_grad():
        full = model(x, attention_bias=bias)  # [B, L, V]
        fwd = BlockForward(model, mode, L)
        first, cached = fwd(x, bias, {}, 12, 16), fwd(x, bias, {}, 12, 16)
    torch.testing.assert_close(first, full[:, 12:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, full[:, 12:16], atol=1e-5, rtol=0)
    cache = fwd.caches["cond"]
    assert cache.k[0].shape == (2, 2, L, 8) and cache.length == L


@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_qwen3_llada_fast_decoding_batched_equals_per_row(mode):
    model, (ids, mask) = tiny_qwen3("sdpa"), prompts()
    config = cfg(cache=mode, threshold=0.5)
    vanilla = generate(model, ids, cfg(threshold=0.5), attention_mask=mask, trace=True)
    batch = generate(model, ids, config, attention_mask=mask, trace=True)
    assert torch.equal(batch.trace.steps[0].tokens, vanilla.trace.steps[0].tokens)  # exact first step
    for r in range(3):
        solo = generate(model, ids[r][mask[r].bool()][None], config)
        assert torch.equal(batch.tokens[r, -16:], solo.tokens[0, -16:]), r


def test_qwen3_llada_offset_without_cache_is_refused():
    with pytest.raises(DifflmError, match="need a kv_cache"):
        tiny_qwen3("eager")(torch.tensor([[1, 2]]), position_offset=3)


class WithoutLogitsAt(torch.nn.Module):
    """The same Transformer behind a forward that cannot take logits_at (full [B, Q, V] logits)."""

    supports_kv_cache, supports_logits_at, logits_shift = True, False, 0

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.inner, self.mask_token_id, self.config = model, model.mask_token_id, model.config
        self.max_length = model.max_length

    def forward(self, input_ids, *, attention_bias=None, position_offset=0, kv_cache=None, attend_len=None):
        return self.inner(
            input_ids,
            attention_bias=attention_bias,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
        )


@pytest.mark.parametrize("mode", ["none", "prefix", "dual", "delayed"])
def test_block_only_vocabulary_projection_changes_nothing(mode):
    """The engine asks for logits of the block's columns only (logits_at); same tokens as full logits."""
    model, (ids, mask) = tiny_model(), prompts()
    config = cfg(cache=mode, threshold=0.5, cfg_scale=1.0)
    packed = generate(model, ids, config, attention_mask=mask)
    full = generate(WithoutLogitsAt(model), ids, config, attention_mask=mask)
    assert torch.equal(packed.tokens, full.tokens) and packed.forward_passes == full.forward_passes


def test_qwen3_llada_cache_for_model_holds_kv_heads_only():
    from difflm.models.layers import KVCache

    cache = KVCache.for_model(tiny_qwen3("eager"), batch=3)
    assert cache.k[0].shape == (3, 2, 64, 8) and cache.n_layer == 2  # GQA: 2 kv heads, all 64 positions


# ----------------------------------------------------------------------------- Fast-dLLM's threshold rule (steps=0)


class FixedConfidence(torch.nn.Module):
    """Same logits whatever the input: position j's argmax is token j % 4 with probability conf[j]."""

    supports_kv_cache, supports_logits_at, logits_shift = False, False, 0

    def __init__(self, conf: list[float], prompt_len: int) -> None:
        super().__init__()
        self.mask_token_id, self.calls, self.max_length = 4, 0, prompt_len + len(conf)
        rows = [[float("-inf")] * 5 for _ in range(prompt_len)]  # prompt rows: never read
        for j, c in enumerate(conf):
            row = [torch.log(torch.tensor((1 - c) / 3)).item()] * 4 + [float("-inf")]
            row[j % 4] = torch.log(torch.tensor(c)).item()
            rows.append(row)
        self.logits = torch.tensor(rows)  # [P + G, 5]

    def forward(self, input_ids, **_):
        self.calls += 1
        return self.logits.expand(len(input_ids), -1, -1)


def test_threshold_without_steps_by_hand():
    """conf [0.95, 0.5, 0.92, 0.3], tau 0.9: step 1 reveals 0 and 2, step 2 the top-1 (1), step 3 the rest.

    With a step count, the reveal schedule is a floor: steps=2 reveals 1 and 3 together in step 2.
    """
    prompt = torch.tensor([[0, 1]])
    model = FixedConfidence([0.95, 0.5, 0.92, 0.3], prompt_len=2)
    out = generate(model, prompt, SampleConfig(gen_length=4, steps=0, threshold=0.9), trace=True)
    assert out.tokens[0, 2:].tolist() == [0, 1, 2, 3] and out.forward_passes == model.calls == 3
    revealed = [step.revealed[0, 2:].nonzero().flatten().tolist() for step in out.trace.steps]
    assert revealed == [[0, 2], [1], [3]]
    capped = generate(model, prompt, SampleConfig(gen_length=4, steps=2, threshold=0.9), trace=True)
    assert capped.forward_passes == 2
    assert [s.revealed[0, 2:].nonzero().flatten().tolist() for s in capped.trace.steps] == [[0, 2], [1, 3]]


def fast_dllm_threshold_loop(model, prompt: torch.Tensor, gen_length: int, block: int, tau: float):
    """Fast-dLLM's generate with a threshold, re-derived as a naive loop (one row, no cache).

    Per block, until it holds no mask: one forward, argmax per position, its float64 softmax
    probability as confidence; reveal the most confident masked position of the block and every
    other one whose confidence is >= tau. Returns (tokens, forward passes).
    """
    mask_id = model.mask_token_id
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1)
    passes, P = 0, prompt.shape[1]
    for start in range(P, P + gen_length, block):
        end = start + block
        while (x[0, start:end] == mask_id).any():
            logits = model(x).double()
            passes += 1
            probs = logits.softmax(-1)
            conf, tok = probs.max(-1)  # [1, L]
            masked = (x == mask_id) & (torch.arange(x.shape[1]) < end)
            conf = conf.masked_fill(~masked, float("-inf"))
            reveal = masked & (conf >= tau)
            reveal[0, int(conf[0].argmax())] = True
            x = torch.where(reveal, tok, x)
    return x, passes


class NoMask(torch.nn.Module):
    """MockDenoiser with the mask logit at -inf (difflm's draw bans it; Fast-dLLM's does not)."""

    supports_kv_cache, supports_logits_at, logits_shift = False, False, 0

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.mask_token_id, self.max_length = inner, inner.mask_token_id, inner.max_length

    def forward(self, input_ids, **kw):
        logits = self.inner(input_ids, **kw).clone()
        logits[..., self.mask_token_id] = float("-inf")
        return logits


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("block", [4, 8])
def test_threshold_without_steps_equals_fast_dllm(mock_denoiser, tau, block):
    model = NoMask(mock_denoiser(vocab=32, seed=3))
    for row in ([[3, 4, 5]], [[7, 1, 2, 9, 11]]):
        prompt = torch.tensor(row)
        ref, ref_passes = fast_dllm_threshold_loop(model, prompt, 16, block, tau)
        out = generate(model, prompt, SampleConfig(gen_length=16, steps=0, block_length=block, threshold=tau))
        assert torch.equal(out.tokens, ref) and out.forward_passes == ref_passes


def test_steps_zero_needs_threshold_or_factor_and_keep_mode():
    with pytest.raises(DifflmError, match="steps=0"):
        SampleConfig(gen_length=8, steps=0)
    with pytest.raises(DifflmError, match="steps=0"):
        SampleConfig(gen_length=8, steps=0, threshold=0.9, mode="resample")
    assert SampleConfig(gen_length=8, steps=0, factor=1.0, block_length=2).steps == 0


@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_shifted_head_samples_the_same_tokens_with_and_without_a_cache(mode):
    model, (ids, mask) = tiny_model(logits_shift=1), prompts()
    base = generate(model, ids, cfg(), attention_mask=mask)
    cached = generate(model, ids, cfg(cache=mode), attention_mask=mask)
    assert torch.equal(cached.tokens, base.tokens)
