"""Corruption invariants: protection, empirical rate, spans, random replacement, seeding, errors."""

import pytest
import torch

from difflm.diffusion.masking import (
    NoiseConfig,
    corrupt,
    decode_block_view,
    protected_mask,
    random_truncate,
)
from difflm.errors import DifflmError

MASK = 63
VOCAB = 64


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mask_kind_replaces_exactly_the_noised_positions():
    ids = _ids(4, 16)
    noisy, noised = corrupt(
        ids, torch.full((4,), 0.5), mask_token_id=MASK, cfg=NoiseConfig(), generator=_gen()
    )
    assert noised.dtype == torch.bool and noisy.shape == ids.shape
    assert bool((noisy[noised] == MASK).all())
    assert torch.equal(noisy[~noised], ids[~noised])


def test_rate_zero_and_one():
    ids = _ids(3, 16)
    noisy, noised = corrupt(
        ids, torch.tensor([0.0, 1.0, 0.0]), mask_token_id=MASK, cfg=NoiseConfig(), generator=_gen()
    )
    assert not noised[0].any() and not noised[2].any()
    assert bool(noised[1].all()) and bool((noisy[1] == MASK).all())


def test_protected_positions_never_touched():
    ids = _ids(8, 16)
    attn = torch.ones(8, 16, dtype=torch.long)
    attn[:, 12:] = 0
    protected = protected_mask(ids, prefix_len=3, attention_mask=attn)
    for cfg in (NoiseConfig(), NoiseConfig(kind="random"), NoiseConfig(span_prob=1.0, min_rate=0.5)):
        noisy, noised = corrupt(
            ids,
            torch.ones(8),
            mask_token_id=MASK,
            cfg=cfg,
            generator=_gen(),
            protected=protected,
            vocab_size=VOCAB,
        )
        assert not noised[protected].any()
        assert torch.equal(noisy[protected], ids[protected])


def test_empirical_rate_matches():
    batch, length = 64, 512
    rate = torch.linspace(0.0, 1.0, batch)
    _, noised = corrupt(_ids(batch, length), rate, mask_token_id=MASK, cfg=NoiseConfig(), generator=_gen(1))
    per_example = noised.float().mean(dim=1)  # [B]
    assert (per_example - rate).abs().max().item() < 0.08  # ~3.6 sigma at p=0.5, L=512
    assert abs(noised.float().mean().item() - rate.mean().item()) < 0.01


def test_spans_are_contiguous_with_the_right_length():
    batch, length = 16, 32
    ids = _ids(batch, length)
    attn = torch.ones(batch, length, dtype=torch.long)
    attn[:, 28:] = 0
    protected = protected_mask(ids, prefix_len=4, attention_mask=attn)  # 24 eligible per example
    rate = torch.linspace(0.1, 1.0, batch)
    _, noised = corrupt(
        ids, rate, mask_token_id=MASK, cfg=NoiseConfig(span_prob=1.0), generator=_gen(), protected=protected
    )
    for b in range(batch):
        idx = noised[b].nonzero().squeeze(1)
        assert idx.numel() == round(rate[b].item() * 24)
        assert idx.numel() == 0 or idx[-1] - idx[0] + 1 == idx.numel()  # one run, no holes
        assert idx.numel() == 0 or (idx[0] >= 4 and idx[-1] < 28)


def test_span_skips_protected_positions_inside_it():
    ids = _ids(1, 8)
    protected = torch.zeros(1, 8, dtype=torch.bool)
    protected[0, 3] = True  # a special token in the middle
    _, noised = corrupt(
        ids,
        torch.ones(1),
        mask_token_id=MASK,
        cfg=NoiseConfig(span_prob=1.0),
        generator=_gen(),
        protected=protected,
    )
    assert noised.tolist() == [[True, True, True, False, True, True, True, True]]


def test_random_kind_never_emits_mask_or_excluded():
    ids = _ids(32, 64)
    excluded = (0, 1, 2)
    noisy, noised = corrupt(
        ids,
        torch.ones(32),
        mask_token_id=MASK,
        cfg=NoiseConfig(kind="random"),
        generator=_gen(),
        vocab_size=VOCAB,
        exclude_ids=excluded,
    )
    assert bool(noised.all())
    drawn = noisy[noised]
    assert not bool(torch.isin(drawn, torch.tensor([MASK, *excluded])).any())
    assert bool(((drawn >= 0) & (drawn < VOCAB)).all())
    assert drawn.unique().numel() == VOCAB - 1 - len(excluded)  # every allowed id shows up in 2048 draws


def test_random_kind_needs_vocab_size():
    with pytest.raises(DifflmError, match="vocab_size"):
        corrupt(
            _ids(1, 4), torch.ones(1), mask_token_id=MASK, cfg=NoiseConfig(kind="random"), generator=_gen()
        )


def test_min_rate_enforced():
    _, noised = corrupt(
        _ids(16, 256), torch.zeros(16), mask_token_id=MASK, cfg=NoiseConfig(min_rate=0.5), generator=_gen()
    )
    assert abs(noised.float().mean().item() - 0.5) < 0.02


def test_same_seed_same_output():
    ids = _ids(4, 16)
    cfg = NoiseConfig(kind="random", span_prob=0.5)
    kw = dict(mask_token_id=MASK, cfg=cfg, vocab_size=VOCAB)
    a = corrupt(ids, torch.full((4,), 0.4), generator=_gen(7), **kw)
    b = corrupt(ids, torch.full((4,), 0.4), generator=_gen(7), **kw)
    c = corrupt(ids, torch.full((4,), 0.4), generator=_gen(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_bad_rate_raises(bad):
    with pytest.raises(DifflmError, match=r"mask rate .* outside \[0, 1\]"):
        corrupt(_ids(2, 4), torch.tensor([0.5, bad]), mask_token_id=MASK, cfg=NoiseConfig(), generator=_gen())


def test_noise_config_validation():
    with pytest.raises(DifflmError, match="mask, random"):
        NoiseConfig(kind="gaussian")
    with pytest.raises(DifflmError, match="span_prob"):
        NoiseConfig(span_prob=1.5)
    with pytest.raises(DifflmError, match="min_rate"):
        NoiseConfig(min_rate=-0.1)


def test_protected_mask_combines_sources():
    ids = torch.tensor([[5, 6, 7, 1, 8, 9], [5, 6, 7, 8, 9, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = protected_mask(ids, prefix_len=1, prompt_lengths=[2, 3], attention_mask=attn, special_ids=(1,))
    assert got.tolist() == [
        [True, True, False, True, False, False],
        [True, True, True, False, True, True],
    ]


def test_random_truncate():
    batch = {"input_ids": _ids(2, 16), "attention_mask": torch.ones(2, 16), "rate": torch.ones(2)}
    assert random_truncate(batch, 0.0, _gen()) is batch
    cut = random_truncate(batch, 1.0, _gen(3))
    new_len = cut["input_ids"].shape[1]
    assert 1 <= new_len <= 16 and cut["attention_mask"].shape == (2, new_len)
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :new_len])
    assert torch.equal(cut["rate"], batch["rate"])
    lengths = {random_truncate(batch["input_ids"], 1.0, _gen(s)).shape[1] for s in range(200)}
    assert min(lengths) >= 1 and max(lengths) <= 16 and len(lengths) > 10
    with pytest.raises(DifflmError, match="one L"):
        random_truncate({"a": torch.ones(2, 3), "b": torch.ones(2, 4)}, 1.0, _gen())


def test_decode_block_view_is_what_a_block_decoder_feeds():
    """Per row: clean before its block, the block as corrupted, masks after (protected kept);
    blocks fall on the grid, the last one shorter when the length is not a multiple."""
    B, L, N = 64, 10, 4
    ids = _ids(B, L)
    protected = torch.zeros(B, L, dtype=torch.bool)
    protected[:, 9] = True
    rate = torch.full((B,), 0.5)
    noisy, _ = corrupt(ids, rate, mask_token_id=MASK, cfg=NoiseConfig(), generator=_gen(), protected=protected)
    out, in_block = decode_block_view(ids, noisy, protected, N, MASK, _gen(1))
    starts = set()
    for b in range(B):
        where = in_block[b].nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1]) + 1
        assert lo % N == 0 and hi == min(lo + N, L) and len(where) == hi - lo
        starts.add(lo)
        assert torch.equal(out[b, :lo], ids[b, :lo])
        assert torch.equal(out[b, lo:hi], noisy[b, lo:hi])
        after = torch.arange(L) >= hi
        assert bool((out[b, after & ~protected[b]] == MASK).all())
        assert torch.equal(out[b, protected[b]], ids[b, protected[b]])
    assert starts == {0, 4, 8}
    _, in_block = decode_block_view(ids, noisy, protected, N, MASK, _gen(1), offset=3)
    assert {int(row.nonzero()[0]) for row in in_block} == {3, 7}
    with pytest.raises(DifflmError, match="decode_offset"):
        decode_block_view(ids, noisy, protected, N, MASK, _gen(1), offset=L)
