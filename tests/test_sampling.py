"""The iterative-unmasking engine and the drawing functions, against a mock denoiser."""

from __future__ import annotations

import pytest
import torch

from difflm.errors import DifflmError
from difflm.sampling.draw import (
    apply_top_k,
    apply_top_p,
    confidence,
    draw_tokens,
    gumbel_argmax,
    reveal_counts,
)
from difflm.sampling.unmask import SampleConfig, cfg_combine, generate, infill, split_steps

PROMPTS = [[3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference_loop(model, prompt: torch.Tensor, gen_length: int) -> torch.Tensor:
    """One step per token: forward, argmax (mask token excluded), reveal the most confident mask."""
    mask_id = model.mask_token_id
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1)
    for _ in range(gen_length):
        logits = model(x).float()
        logits[..., mask_id] = float("-inf")
        probs = logits.softmax(-1)
        conf, tok = probs.max(-1)  # [1, L]
        conf = conf.masked_fill(x != mask_id, -1.0)
        pos = int(conf[0].argmax())
        x[0, pos] = tok[0, pos]
    return x


def test_engine_equals_reference_loop(mock_denoiser):
    model = mock_denoiser()
    prompt = torch.tensor([[3, 4, 5]])
    cfg = SampleConfig(gen_length=8, steps=8)
    result = generate(model, prompt, cfg)
    assert torch.equal(result.tokens, reference_loop(model, prompt, 8))
    assert result.forward_passes == 8


@pytest.mark.parametrize("schedule", ["even", "linear", "cosine"])
@pytest.mark.parametrize(("n", "steps"), [(10, 4), (7, 7), (3, 5), (64, 9), (1, 1)])
def test_reveal_counts_sum(schedule, n, steps):
    counts = reveal_counts(n, steps, schedule)
    assert len(counts) == steps and sum(counts) == n and min(counts) >= 0
    if n >= steps:
        assert min(counts) >= 1


def test_reveal_counts_even_is_llada_split():
    assert reveal_counts(10, 4, "even") == [3, 3, 2, 2]
    assert reveal_counts(10, 4, "linear") == [3, 2, 3, 2]  # masked after: floor(10 * (1 - s/4)) = 7, 5, 2, 0


def test_split_steps_uneven_blocks():
    assert split_steps([4, 4, 2], 7) == [3, 3, 1]
    assert split_steps([8, 8], 16) == [8, 8]
    with pytest.raises(DifflmError):
        split_steps([4, 4, 2], 2)


@pytest.mark.parametrize("schedule", ["even", "linear", "cosine"])
@pytest.mark.parametrize(("gen", "block", "steps"), [(10, 4, 7), (8, None, 3), (9, 3, 9), (12, 5, 4)])
def test_reveals_sum_to_gen_length(mock_denoiser, schedule, gen, block, steps):
    cfg = SampleConfig(gen_length=gen, steps=steps, block_length=block, reveal_schedule=schedule)
    result = generate(mock_denoiser(), torch.tensor([[1, 2]]), cfg, trace=True)
    per_step = [int(s.revealed.sum()) for s in result.trace.steps]
    assert sum(per_step) == gen and min(per_step) >= 1
    assert len(per_step) == steps == result.forward_passes
    assert not (result.tokens == result.trace.mask_token_id).any()
    sizes = cfg.block_sizes(gen)
    for k, (size, n_steps) in enumerate(zip(sizes, split_steps(sizes, steps), strict=True)):
        block_counts = [c for c, s in zip(per_step, result.trace.steps, strict=True) if s.block == k]
        assert block_counts == reveal_counts(size, n_steps, schedule)


@pytest.mark.parametrize(
    "remasking", ["low_confidence", "random", "random_topk", "margin", "entropy", "left_to_right"]
)
def test_keep_mode_revealed_tokens_never_change(mock_denoiser, remasking):
    cfg = SampleConfig(gen_length=12, steps=5, block_length=5, remasking=remasking, temperature=0.8)
    ids, mask = left_padded(PROMPTS)
    result = generate(
        mock_denoiser(), ids, cfg, attention_mask=mask, trace=True, generator=torch.Generator().manual_seed(0)
    )
    mask_id = result.trace.mask_token_id
    previous = result.trace.initial
    for step in result.trace.steps:
        was_revealed = previous != mask_id
        assert torch.equal(step.tokens[was_revealed], previous[was_revealed])
        previous = step.tokens
    assert torch.equal(previous, result.tokens)


def test_left_to_right_reveals_the_leftmost_masks_first(mock_denoiser):
    cfg = SampleConfig(gen_length=12, steps=6, block_length=12, remasking="left_to_right", temperature=0.8)
    ids, mask = left_padded(PROMPTS)
    result = generate(
        mock_denoiser(), ids, cfg, attention_mask=mask, trace=True, generator=torch.Generator().manual_seed(0)
    )
    mask_id = result.trace.mask_token_id
    for step in result.trace.steps:  # two a step: the masks left are always a suffix of each row
        masked = step.tokens == mask_id
        assert torch.equal(masked, masked.cummax(dim=1).values)
    assert not (result.tokens == mask_id).any()


@pytest.mark.parametrize("mode", ["keep", "resample"])
def test_prompt_never_changes(mock_denoiser, mode):
    ids, mask = left_padded(PROMPTS)
    cfg = SampleConfig(gen_length=8, steps=4, mode=mode, temperature=1.0)
    result = generate(
        mock_denoiser(), ids, cfg, attention_mask=mask, trace=True, generator=torch.Generator().manual_seed(1)
    )
    P = ids.shape[1]
    for step in result.trace.steps:
        assert torch.equal(step.tokens[:, :P], ids)
    assert torch.equal(result.tokens[:, :P], ids)


def test_resample_mode_masks_follow_schedule(mock_denoiser):
    cfg = SampleConfig(gen_length=10, steps=4, mode="resample", reveal_schedule="linear")
    result = generate(mock_denoiser(), torch.tensor([[1, 2]]), cfg, trace=True)
    mask_id = result.trace.mask_token_id
    still_masked = [int((s.tokens == mask_id).sum()) for s in result.trace.steps]
    assert still_masked == [7, 5, 2, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_single_rows(mock_denoiser, temperature):
    model = mock_denoiser()
    cfg = SampleConfig(gen_length=9, steps=5, block_length=4, temperature=temperature)
    ids, mask = left_padded(PROMPTS)
    seeds = [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batch = generate(model, ids, cfg, attention_mask=mask, generator=gens).tokens
    P = ids.shape[1]
    for b, prompt in enumerate(PROMPTS):
        single = generate(
            model, torch.tensor([prompt]), cfg, generator=[torch.Generator().manual_seed(seeds[b])]
        )
        assert torch.equal(batch[b, P - len(prompt) :], single.tokens[0])


def test_right_padding_is_converted_to_left(mock_denoiser):
    model = mock_denoiser()
    cfg = SampleConfig(gen_length=6, steps=6)
    P = max(map(len, PROMPTS))
    right = torch.tensor([p + [0] * (P - len(p)) for p in PROMPTS])
    right_mask = torch.tensor([[1] * len(p) + [0] * (P - len(p)) for p in PROMPTS])
    ids, mask = left_padded(PROMPTS)
    a = generate(model, right, cfg, attention_mask=right_mask)
    b = generate(model, ids, cfg, attention_mask=mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask[:, :P], mask)


def test_cfg_combine_formula():
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 3.0, 1.0])
    assert torch.equal(cfg_combine(cond, uncond, 2.0), torch.tensor([3.0, 0.0, 7.0]))
    assert torch.equal(cfg_combine(cond, uncond, 0.0), cond)


def test_cfg_one_batched_forward_with_masked_prompt(mock_denoiser):
    model = mock_denoiser()
    ids, mask = left_padded(PROMPTS[:2])
    cfg = SampleConfig(gen_length=4, steps=4, cfg_scale=1.5)
    result = generate(model, ids, cfg, attention_mask=mask)
    assert result.forward_passes == 4 == len(model.calls)
    P = ids.shape[1]
    for x in model.calls:
        cond, uncond = x.chunk(2)
        assert torch.equal(cond[:, :P], ids)
        assert torch.equal(uncond[:, :P][mask.bool()], torch.full((int(mask.sum()),), model.mask_token_id))
        assert torch.equal(uncond[:, P:], cond[:, P:])


def test_cfg_step_equals_formula(mock_denoiser):
    """A one-token generation: the revealed token is the argmax of the guided logits."""
    model = mock_denoiser()
    prompt = torch.tensor([[3, 4, 5]])
    cfg = SampleConfig(gen_length=1, steps=1, cfg_scale=2.0)
    out = generate(model, prompt, cfg).tokens
    x = torch.tensor([[3, 4, 5, model.mask_token_id]])
    x_u = torch.full_like(x, model.mask_token_id)
    guided = cfg_combine(model(x), model(x_u), 2.0)[0, -1]
    guided[model.mask_token_id] = float("-inf")
    assert int(out[0, -1]) == int(guided.argmax())


def test_cfg_with_uncond_kwargs(mock_denoiser):
    model = mock_denoiser()
    cond = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 3
    cfg = SampleConfig(gen_length=4, steps=4, cfg_scale=1.0)
    res = generate(
        model, torch.tensor([[1, 2]]), cfg, model_kwargs={"cond": cond}, uncond_kwargs={"cond": None}
    )
    assert res.forward_passes == 8  # a tensor and None cannot share one batch: two calls per step
    res = generate(
        model,
        torch.tensor([[1, 2]]),
        cfg,
        model_kwargs={"cond": cond},
        uncond_kwargs={"cond": torch.zeros_like(cond)},
    )
    assert res.forward_passes == 4


def test_seed_determinism(mock_denoiser):
    model = mock_denoiser()
    cfg = SampleConfig(gen_length=16, steps=8, temperature=1.0, remasking="random")

    def run(seed: int) -> torch.Tensor:
        return generate(
            model, torch.tensor([[1, 2]]), cfg, generator=torch.Generator().manual_seed(seed)
        ).tokens

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_threshold_one_equals_vanilla(mock_denoiser):
    model = mock_denoiser()
    prompt = torch.tensor([[3, 4, 5]])
    vanilla = generate(model, prompt, SampleConfig(gen_length=8, steps=8))
    thresholded = generate(model, prompt, SampleConfig(gen_length=8, steps=8, threshold=1.0))
    assert torch.equal(vanilla.tokens, thresholded.tokens)
    fast = generate(model, prompt, SampleConfig(gen_length=8, steps=8, threshold=0.05), trace=True)
    assert fast.forward_passes < 8 and not (fast.tokens == model.mask_token_id).any()


def test_eos_fill_and_stop(mock_denoiser):
    model = mock_denoiser()
    eos = 3
    boost = torch.zeros(1, 32)
    boost[0, eos] = 4.0  # make EOS likely so it appears early
    base = dict(gen_length=12, steps=12, eos_token_id=eos)
    passes = {}
    for mode in ("none", "fill", "stop"):
        res = generate(
            model, torch.tensor([[1, 2]]), SampleConfig(**base, eos_mode=mode), model_kwargs={"cond": boost}
        )
        gen = res.tokens[0, 2:].tolist()
        first = gen.index(eos)
        passes[mode] = res.forward_passes
        if mode != "none":
            assert gen[first:] == [eos] * (len(gen) - first)
    assert passes["none"] == 12 and passes["stop"] < 12 and passes["fill"] <= 12


def test_suppress_tokens(mock_denoiser):
    model = mock_denoiser()
    plain = generate(model, torch.tensor([[1, 2]]), SampleConfig(gen_length=10, steps=5)).tokens[0, 2:]
    banned = sorted(set(plain.tolist()))[:3]
    out = generate(
        model, torch.tensor([[1, 2]]), SampleConfig(gen_length=10, steps=5, suppress_tokens=banned)
    ).tokens
    assert not any(t in banned for t in out[0, 2:].tolist())


def test_infill_arbitrary_positions(mock_denoiser):
    model = mock_denoiser()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    fill = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1]]).bool()
    res = infill(model, ids, fill, SampleConfig(gen_length=4, steps=4, block_length=2), trace=True)
    assert torch.equal(res.tokens[~fill], ids[~fill])
    assert not (res.tokens == model.mask_token_id).any()
    assert [s.block for s in res.trace.steps] == [0, 0, 1, 1]
    assert res.trace.steps[1].tokens[0, 5] == model.mask_token_id  # block 0 = the first two fill positions


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=0),
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(threshold=0.0),
        dict(threshold=1.2),
        dict(cfg_scale=-1.0),
        dict(block_length=9),
        dict(steps=9),
        dict(block_length=2, steps=3),
        dict(remasking="nope"),
        dict(reveal_schedule="nope"),
        dict(eos_mode="fill"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(DifflmError):
        SampleConfig(**{"gen_length": 8, "steps": 4, **kwargs})


def test_bad_inputs_raise(mock_denoiser):
    with pytest.raises(DifflmError, match="block length 9 larger than the generation length 8"):
        SampleConfig(gen_length=8, steps=4, block_length=9)
    model = mock_denoiser()
    with pytest.raises(DifflmError, match="max length"):
        generate(model, torch.tensor([[1, 2, 3]]), SampleConfig(gen_length=8, steps=4), max_length=10)
    model.mask_token_id = None
    with pytest.raises(DifflmError, match="mask_token_id"):
        generate(model, torch.tensor([[1, 2, 3]]), SampleConfig(gen_length=8, steps=4))


def test_top_k_top_p_and_confidence_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [False, False, True, True]
    probs = logits.softmax(-1)  # [0.644, 0.237, 0.087, 0.032]
    assert torch.isinf(apply_top_p(logits, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(apply_top_p(logits, 0.5)).tolist() == [False, True, True, True]
    chosen = torch.tensor(1)
    assert torch.allclose(confidence(probs, chosen, "low_confidence"), probs[1])
    assert torch.allclose(confidence(probs, chosen, "margin"), probs[0] - probs[1])
    assert torch.allclose(confidence(probs, chosen, "entropy"), (probs * probs.log()).sum())


def test_gumbel_argmax_samples_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(20000, 3)
    assert torch.equal(gumbel_argmax(logits, 0.0), torch.zeros(20000, dtype=torch.long))
    draws = gumbel_argmax(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert torch.allclose(freq, logits[0].double().softmax(-1), atol=0.015)
    chosen, _ = draw_tokens(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chosen, torch.zeros(20000, dtype=torch.long))


def test_greedy_confidence_equals_argmax_and_softmax_probability():
    from difflm.sampling.draw import greedy_confidence

    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, 0, 7] = float("-inf")  # banned ids arrive as -inf
    chosen, conf = greedy_confidence(logits)
    probs = logits.softmax(-1)
    assert torch.equal(chosen, logits.argmax(-1))
    torch.testing.assert_close(conf, probs.gather(-1, chosen[..., None]).squeeze(-1), atol=1e-6, rtol=0)
