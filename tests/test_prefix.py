"""PrefixCollator: what may be masked, labels, the per-batch rate, validation."""

from __future__ import annotations

import pytest
import torch

from difflm.data.prefix import DEFAULT_RATES, IGNORE_INDEX, PrefixCollator
from difflm.errors import DifflmError

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def example(n_words: int, start: int = 10) -> list[int]:
    return [CLS] + [start + (i % 50) for i in range(n_words)] + [SEP]


def test_masks_only_after_prefix_and_never_special_or_padding() -> None:
    collator = PrefixCollator(PAD, MASK, special_ids=[CLS, SEP], prefix_len=4, rates=[1.0], max_length=16)
    batch = collator([example(12), example(5), example(2)], torch.Generator().manual_seed(0))
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == attn.shape == labels.shape == (3, 14)
    assert attn.sum(1).tolist() == [14, 7, 4]
    expected = torch.tensor(
        [[False] * 4 + [True] * 9 + [False], [False] * 4 + [True] * 2 + [False] * 8, [False] * 14]
    )  # rate 1.0 masks exactly: after the prefix, not [SEP], not padding
    assert torch.equal(ids == MASK, expected)
    original = collator._pad([example(12), example(5), example(2)])[0]
    assert torch.equal(labels[expected], original[expected])
    assert (labels[~expected] == IGNORE_INDEX).all()
    assert torch.equal(ids[~expected], original[~expected])
    assert float(batch["rate"]) == 1.0


def test_truncates_to_max_length() -> None:
    collator = PrefixCollator(PAD, MASK, special_ids=[CLS, SEP], prefix_len=2, max_length=8)
    batch = collator([example(30)], torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (1, 8)


def test_empirical_rate_matches_drawn_rate_and_is_seeded() -> None:
    collator = PrefixCollator(PAD, MASK, special_ids=[CLS, SEP], prefix_len=4, max_length=64)
    examples = [example(62) for _ in range(256)]
    seen = set()
    for step in range(6):
        batch = collator(examples, torch.Generator().manual_seed(step))
        rate = float(batch["rate"])
        assert round(rate, 1) in DEFAULT_RATES
        seen.add(rate)
        maskable = 256 * (64 - 4 - 1)  # everything after the prefix but [SEP]
        masked = int((batch["labels"] != IGNORE_INDEX).sum())
        assert int((batch["input_ids"] == MASK).sum()) == masked
        assert abs(masked / maskable - rate) < 0.01  # sd ~0.0036 at n = 15104
        again = collator(examples, torch.Generator().manual_seed(step))
        assert torch.equal(again["input_ids"], batch["input_ids"])
    assert len(seen) > 1  # the rate is drawn per batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix_len": 20, "max_length": 16}, "prefix 20 is longer than max length 16"),
        ({"prefix_len": 16, "max_length": 16}, "prefix 16 is as long as max length 16"),
        ({"rates": [0.5, 0.0]}, r"each in \(0, 1\]"),
        ({"rates": [1.5]}, r"each in \(0, 1\]"),
        ({"rates": []}, "non-empty"),
    ],
)
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(DifflmError, match=message):
        PrefixCollator(PAD, MASK, special_ids=[CLS, SEP], **kwargs)
