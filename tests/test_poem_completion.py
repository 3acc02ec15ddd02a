"""Poem-completion benchmark: seeded masked positions, exact metrics, the AR fillers, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from difflm.data.tokenizers import CharTokenizer
from difflm.errors import DifflmError
from difflm.evaluate.metrics import bleu, chrf, exact_match, token_accuracy
from difflm.evaluate.poem_completion import (
    Case,
    CompletionConfig,
    bootstrap_ci,
    build_cases,
    fill_ar_left,
    fill_ar_rescored,
    markdown_table,
    masked_positions,
    score,
)

POEMS = ["春风吹过山岗/夜里的河流/我们在灯下读信/雪落在远方", "大海/蓝色的梦/一只鸟飞过屋顶/太阳升起来了"]


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer.from_texts(POEMS)


def test_masked_positions_seeded_identical_and_never_separator(tokenizer: CharTokenizer) -> None:
    cfg = CompletionConfig(ratios=[0.2, 0.6], n_poems=2, seed=3, prefix_len=4)
    first, again = build_cases(POEMS, tokenizer, 64, cfg), build_cases(POEMS, tokenizer, 64, cfg)
    other = build_cases(
        POEMS, tokenizer, 64, CompletionConfig(ratios=[0.2, 0.6], n_poems=2, seed=4, prefix_len=4)
    )
    slash = tokenizer.encode("/")[0]
    for ratio in cfg.ratios:
        assert [c.positions for c in first[ratio]] == [c.positions for c in again[ratio]]
        for case in first[ratio]:
            tokens = [case.ids[p] for p in case.positions]
            assert slash not in tokens and tokenizer.eos_token_id not in tokens
            assert min(case.positions) >= 4 and case.positions == sorted(set(case.positions))
            eligible = [
                i for i, t in enumerate(case.ids) if i >= 4 and t != slash and t != tokenizer.eos_token_id
            ]
            assert len(case.positions) == round(ratio * len(eligible))
    assert [c.positions for c in first[0.6]] != [c.positions for c in other[0.6]]


def test_accuracy_and_chrf_on_a_hand_made_two_poem_case(tokenizer: CharTokenizer) -> None:
    ids = [tokenizer.encode(p) for p in ("大海蓝", "山岗")]
    cases = [Case(ids[0], [1, 2]), Case(ids[1], [1])]
    preds = [[ids[0][1], ids[1][0]], [ids[1][1]]]  # poem 1: one right, one wrong; poem 2: right
    result = score(cases, preds, tokenizer)
    assert result["accuracy"] == 2 / 3
    assert result["masked"] == 3
    assert chrf(["大海蓝", "山岗"], ["大海蓝", "山岗"]) == 100.0
    assert token_accuracy([[1, 2], [3]], [[1, 0], [3]]) == 2 / 3
    assert exact_match([[1, 2], [3]], [[1, 0], [3]]) == 1 / 2
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    row = {"method": "m", "ratio": 0.1, "accuracy": 0.5, "chrf": 40.0, "acc_ci95": (0.25, 0.75)}
    assert "| 0.1 | 0.5000 [0.250, 0.750] | 40.00 |" in markdown_table([row], "t")


def test_bootstrap_interval_over_poems() -> None:
    cases = [Case(ids=[0] * 6, positions=[1, 2, 3, 4]) for _ in range(20)]
    same = torch.full((20,), 2)  # every poem: 2 of 4 right
    assert bootstrap_ci(same, None, cases, seed=0) == (0.5, 0.5)
    assert bootstrap_ci(same, same, cases, seed=0) == (0.0, 0.0)  # paired: no difference at all
    mixed = torch.tensor([4, 0] * 10)  # half the poems all right, half all wrong
    low, high = bootstrap_ci(mixed, None, cases, seed=0)
    assert 0.25 < low < 0.5 < high < 0.75 and bootstrap_ci(mixed, None, cases, seed=0) == (low, high)
    better = bootstrap_ci(mixed + (mixed == 0), mixed, cases, seed=1)  # +1 of 4 on half the poems
    assert better[0] > 0 and better[1] <= 0.25 + 1e-9


def test_bad_ratios_and_misaligned_metrics_raise() -> None:
    for ratios in ([0.0], [1.0], [1.5], []):
        with pytest.raises(DifflmError, match=r"\(0, 1\)"):
            CompletionConfig(ratios=ratios)
    with pytest.raises(DifflmError, match=r"\(0, 1\)"):
        masked_positions([1, 2, 3], 1.2, prefix_len=0, excluded=set(), generator=torch.Generator())
    with pytest.raises(DifflmError, match="align"):
        token_accuracy([[1]], [[1, 2]])


class NextIsPlusOne(nn.Module):
    """A causal 'model' whose next token is always the current one + 1 (mod V)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.one_hot((x + 1) % self.vocab, self.vocab).float() * 10  # [B, L, V]


def test_ar_fillers_follow_the_model(tokenizer: CharTokenizer) -> None:
    model, n = NextIsPlusOne(tokenizer.vocab_size), len(tokenizer.chars)
    cases = [Case(list(range(10)), [3, 4, 8]), Case(list(range(5, 14)), [6])]
    cfg = CompletionConfig(n_poems=2, candidates=3, batch_size=2)
    left = fill_ar_left(model, cases, tokenizer, cfg)
    assert left == [[3, 4, 8], [11]] and n > 14  # each masked token = left neighbour + 1
    wrong = [[0, 0, 0], [0]]  # rescoring from bad fills recovers the poem's own tokens
    assert fill_ar_rescored(model, cases, wrong, tokenizer, cfg) == [[3, 4, 8], [11]]


def test_cached_left_to_right_equals_the_plain_loop(tokenizer: CharTokenizer) -> None:
    from difflm.evaluate.poem_completion import _left_to_right
    from difflm.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(
            vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, causal=True
        )
    ).eval()
    cases = [Case(list(range(12)), [2, 3, 9]), Case(list(range(3, 11)), [5])]
    ids = torch.full((2, 12), tokenizer.pad_token_id)
    ids[0, :12], ids[1, :8] = torch.arange(12), torch.arange(3, 11)
    banned = sorted(tokenizer.special_ids)

    class Plain(torch.nn.Module):  # the same model without the cached path
        def forward(self, x):
            return model(x)

    with torch.no_grad():
        cached = _left_to_right(model, ids, cases, banned)
        plain = _left_to_right(Plain(), ids, cases, banned)
    assert torch.equal(cached, plain)
    assert not torch.equal(cached, ids)  # something was filled
