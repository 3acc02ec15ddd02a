"""The autoregressive baseline: cached decoding equals full recomputation, for both backends."""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from difflm.errors import DifflmError
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.sampling.autoregressive import cache_keyword, generate_ar

VOCAB = 64


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            initializer_range=0.3,
            tie_word_embeddings=False,
        )
        model = GPT2LMHeadModel(cfg)
    elif kind == "qwen3":
        cfg = Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=32,
        )
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = TransformerConfig(
            vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, causal=True, tie_embeddings=False
        )
        model = Transformer(cfg)
        with torch.no_grad():  # larger weights than the 0.02 init: varied output, no near-tie argmaxes
            for p in model.parameters():
                p.mul_(15.0 if p.dim() > 1 else 1.0)
    return model.eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def greedy_uncached(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: recompute the whole sequence for every new token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


BACKENDS = ["gpt2", "qwen3", "difflm"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_cached_greedy_equals_uncached(kind):
    model = build(kind)
    prompt = torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    result = generate_ar(model, prompt, max_new_tokens=10)
    assert torch.equal(result.tokens, greedy_uncached(model, prompt, 10))
    assert result.forward_passes == 10


@pytest.mark.parametrize("kind", BACKENDS)
def test_left_padded_batch_equals_single_rows(kind):
    model = build(kind)
    prompts = [[5, 6], [1, 2, 3, 4, 5]]
    ids = torch.tensor([[0, 0, 0, 5, 6], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    batch = generate_ar(model, ids, max_new_tokens=6, attention_mask=mask).tokens
    for b, p in enumerate(prompts):
        single = generate_ar(model, torch.tensor([p]), max_new_tokens=6).tokens[0]
        assert torch.equal(batch[b, 5 - len(p) :], single)


class GPT2WithOldCacheName(GPT2LMHeadModel):
    """GPT-2 as transformers before 5.24 names its cache: `past_key_values`, in and out."""

    def forward(self, input_ids=None, past_key_values=None, **kw):
        out = super().forward(input_ids=input_ids, cache=past_key_values, **kw)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


@pytest.mark.skipif(
    "cache" not in inspect.signature(GPT2LMHeadModel.forward).parameters,
    reason="this transformers names the cache past_key_values itself (the other path)",
)
def test_cache_goes_under_the_name_the_model_takes():
    new = build("gpt2")
    old = GPT2WithOldCacheName(new.config).eval()
    old.load_state_dict(new.state_dict())
    assert cache_keyword(old) == "past_key_values" and cache_keyword(new) == "cache"
    prompt = torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    reference = greedy_uncached(new, prompt, 8)
    assert torch.equal(generate_ar(old, prompt, max_new_tokens=8).tokens, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would warn
        assert torch.equal(generate_ar(new, prompt, max_new_tokens=8).tokens, reference)


def test_eos_fills_and_stops():
    model = build("difflm")
    prompt = torch.tensor([[1, 2, 3]])
    free = generate_ar(model, prompt, max_new_tokens=8).tokens[0, 3:].tolist()
    eos = free[2]
    first = free.index(eos)
    res = generate_ar(model, prompt, max_new_tokens=8, eos_token_id=eos)
    assert res.tokens[0, 3:].tolist() == free[: first + 1] + [eos] * (8 - first - 1)
    assert res.forward_passes == first + 1


def test_trace_one_step_per_token():
    model = build("difflm")
    res = generate_ar(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=5, trace=True)
    steps = res.trace.steps
    assert len(steps) == 5
    for t, step in enumerate(steps):
        assert step.revealed.sum(1).tolist() == [1, 1] and bool(step.revealed[:, 3 + t].all())
    assert torch.equal(steps[-1].tokens, res.tokens)


def test_sampling_is_seeded():
    model = build("qwen3")
    prompt = torch.tensor([[1, 2, 3]])

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate_ar(model, prompt, max_new_tokens=12, temperature=1.5, generator=gen).tokens

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_bad_inputs_raise():
    bidirectional = Transformer(
        TransformerConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32)
    )
    with pytest.raises(DifflmError, match="causal"):
        generate_ar(bidirectional, torch.tensor([[1, 2]]), max_new_tokens=3)
    model = build("difflm")
    with pytest.raises(DifflmError, match="block_size"):
        generate_ar(model, torch.tensor([[1, 2]]), max_new_tokens=40)
    with pytest.raises(DifflmError):
        generate_ar(model, torch.tensor([[1, 2]]), max_new_tokens=0)
    with pytest.raises(DifflmError):
        generate_ar(model, torch.tensor([[1, 2]]), max_new_tokens=3, top_p=0.0)


def test_suppressed_tokens_are_never_drawn_and_the_rest_is_unchanged() -> None:
    model = build("difflm")
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    free = generate_ar(model, prompt, max_new_tokens=12).tokens[:, 4:]  # greedy
    banned = sorted(set(free[:, 0].tolist()))  # the first greedy choice of each row
    out = generate_ar(model, prompt, max_new_tokens=12, suppress_tokens=banned).tokens[:, 4:]
    assert not torch.isin(out, torch.tensor(banned)).any()
    logits = model(prompt)[:, -1].masked_fill(torch.isin(torch.arange(VOCAB), torch.tensor(banned)), float("-inf"))
    assert torch.equal(out[:, 0], logits.argmax(-1))  # the next best token instead
