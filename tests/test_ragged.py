"""Block diffusion with rows at different blocks (sampling/ragged.py): each row gets the tokens it
gets alone, in fewer forwards than a batch kept in step; per-row position offsets in the model."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from difflm.config import DiffusionConfig
from difflm.models.layers import KVCache
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.sampling.unmask import SampleConfig, generate
from difflm.train.objectives import MaskedDiffusionObjective

V, MASK = 17, 16
PROMPT = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 8, 9, 10], [11, 2, 13, 7, 0]])  # counting, counting, random
REAL = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@functools.cache
def tiny(shift: int = 0, lookahead: bool = False, steps: int = 0) -> Transformer:
    """A 2 x 16 BD3 model (K = 4), trained for `steps` on sequences that count up by one (mod 16)
    or are random, so it is sure of a counting row's next tokens and unsure of a random row's."""
    torch.manual_seed(5)
    cfg = TransformerConfig(
        vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, mask_token_id=MASK,
        logits_shift=shift, lookahead_row=lookahead,
    )  # fmt: skip
    model = Transformer(cfg)
    task = MaskedDiffusionObjective(DiffusionConfig(block_length=4), mask_token_id=MASK, vocab_size=V)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        counting = (torch.randint(0, MASK, (32, 1), generator=g) + torch.arange(16)) % MASK
        noise = torch.randint(0, MASK, (32, 16), generator=g)
        x = torch.where(torch.arange(32)[:, None] % 2 == 0, counting, noise)
        loss, _ = task.loss(model, task.prepare({"input_ids": x}, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def offsets_seen(model: Transformer) -> list:
    """Spy on the model's forward: the position_offset of every call."""
    seen, forward = [], model.forward

    def spy(ids, **kw):
        seen.append(kw.get("position_offset", 0))
        return forward(ids, **kw)

    model.forward = spy
    return seen


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_apart_give_each_row_its_tokens_alone_in_fewer_forwards(shift, temperature):
    """Each row's tokens are the ones it gets alone (one generator per row); the batch takes as
    many forwards as its slowest row alone, where a batch kept in step waits at every block for the
    slowest row of that block."""
    model = tiny(shift, steps=200)
    cfg = SampleConfig(
        gen_length=16, steps=0, block_length=4, block_causal=True, cache="prefix", threshold=0.5,
        temperature=temperature,
    )  # fmt: skip

    def gens():
        return [torch.Generator().manual_seed(row) for row in range(len(PROMPT))]

    seen = offsets_seen(model)
    apart = generate(model, PROMPT, cfg, attention_mask=REAL, generator=gens())
    assert any(isinstance(o, torch.Tensor) for o in seen)  # rows went apart
    in_step = generate(model, PROMPT, dataclasses.replace(cfg, rows_apart=False), attention_mask=REAL, generator=gens())
    alone = [
        generate(model, PROMPT[r : r + 1], cfg, attention_mask=REAL[r : r + 1], generator=[gens()[r]])
        for r in range(len(PROMPT))
    ]
    assert torch.equal(apart.tokens, in_step.tokens)
    assert torch.equal(apart.tokens, torch.cat([a.tokens for a in alone]))
    assert (apart.tokens[:, -16:] != MASK).all()
    assert apart.forward_passes == max(a.forward_passes for a in alone) <= in_step.forward_passes
    if shift:  # the trained shifted model is sure of the counting rows: they reveal several a step
        assert min(a.forward_passes for a in alone) < 16


def test_per_row_offsets_equal_each_row_at_its_own_offset():
    model = tiny()
    x = torch.randint(0, MASK, (2, 12))
    starts = torch.tensor([4, 8])
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, max_len=12)
        model(x, kv_cache=cache, position_offset=0, attend_len=12)
        both = model(
            torch.stack([x[0, 4:8], x[1, 8:12]]), kv_cache=cache, position_offset=starts, attend_len=12
        )  # row 0 attends over 12 slots too: slots [8, 12) hold row 0's own keys from the prefill
        for row, start in enumerate(starts.tolist()):
            alone = KVCache.for_model(model, 1, max_len=12)
            model(x[row : row + 1], kv_cache=alone, position_offset=0, attend_len=12)
            one = model(x[row : row + 1, start : start + 4], kv_cache=alone, position_offset=start, attend_len=12)
            torch.testing.assert_close(both[row], one[0])


@pytest.mark.parametrize("why", ["trace", "lookahead", "steps"])
def test_rows_stay_in_step_when_going_apart_does_not_apply(why):
    model = tiny(1, lookahead=why == "lookahead")
    cfg = SampleConfig(gen_length=8, steps=0 if why != "steps" else 8, block_length=4, block_causal=True,
                       cache="prefix", threshold=0.5)  # fmt: skip
    seen = offsets_seen(model)
    generate(model, PROMPT, cfg, attention_mask=REAL, trace=why == "trace")
    assert not any(isinstance(o, torch.Tensor) for o in seen)
