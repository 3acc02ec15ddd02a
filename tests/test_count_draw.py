"""diffusion.draw=count: each block (or sequence) masks a uniform count of its tokens, weight n/m."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflm.config import DiffusionConfig
from difflm.diffusion.masking import counted_positions
from difflm.errors import DifflmError
from difflm.train.objectives import MaskedDiffusionObjective

MASK = 2


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_each_group_masks_its_count_among_eligible_positions_only():
    eligible = torch.rand(64, 11, generator=_gen(1)) > 0.3
    eligible[0, :4] = False  # a block with nothing to mask
    u = torch.rand(64, 3, generator=_gen(2))
    noised, fraction = counted_positions(eligible, u, _gen(3), group=4)
    assert not bool((noised & ~eligible).any())
    for start in range(0, 11, 4):
        n = eligible[:, start : start + 4].sum(1)
        m = torch.minimum((u[:, start // 4] * n).floor().long() + 1, n)
        assert torch.equal(noised[:, start : start + 4].sum(1), m)
        expected = torch.where(n > 0, m / n.clamp(min=1), torch.ones(64))
        assert torch.equal(fraction[:, start : start + 4], expected[:, None].expand(64, min(4, 11 - start)))


def test_every_set_of_a_count_is_drawn_alike():
    """Given m, the masked set is uniform over the m-subsets: each of the 6 pairs of 4 about 1/6."""
    eligible = torch.ones(6000, 4, dtype=torch.bool)
    noised, _ = counted_positions(eligible, torch.full((6000, 1), 0.3), _gen(0))  # m = 2 of 4
    codes = (noised.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16)[[3, 5, 6, 9, 10, 12]]
    assert int(counts.sum()) == 6000 and bool(((counts - 1000).abs() < 120).all())


class _CountsMasks(nn.Module):
    """Logits that depend on how many masks the row holds, so the CE of a masked token is c(k)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(-1.0, 2.0, length + 1))

    def forward(self, ids: torch.Tensor, attention_bias=None) -> torch.Tensor:
        k = (ids == MASK).sum(1)  # [B]
        logits = torch.zeros(*ids.shape, 3)
        logits[..., 0] = self.scale[k][:, None]
        return logits

    def ce(self, k: int) -> float:
        return float(-F.log_softmax(torch.tensor([float(self.scale[k]), 0.0, 0.0]), -1)[0])


def test_count_loss_is_the_elbo_exactly_with_a_stratified_batch():
    """Rows of L all-zero tokens: the ELBO is (1/L) sum_m c(m) (E_t[(1/t) k c(k)] summed over k);
    with B a multiple of L the stratified counts are exactly uniform, so one batch's loss is it."""
    L, B = 5, 40
    model = _CountsMasks(L)
    task = MaskedDiffusionObjective(DiffusionConfig(draw="count"), mask_token_id=MASK, vocab_size=3)
    batch = task.prepare({"input_ids": torch.zeros(B, L, dtype=torch.long)}, _gen(4))
    assert torch.equal(torch.bincount(batch["noised"].sum(1), minlength=L + 1)[1:], torch.full((L,), B // L))
    loss, _ = task.loss(model, batch)
    expected = sum(model.ce(m) for m in range(1, L + 1)) / L
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_block_diffusion_counts_per_block():
    cfg = DiffusionConfig(draw="count", block_length=4)
    task = MaskedDiffusionObjective(cfg, mask_token_id=MASK, vocab_size=3)
    batch = task.prepare({"input_ids": torch.zeros(16, 12, dtype=torch.long)}, _gen(5))
    per_block = batch["noised"].view(16, 3, 4).sum(-1)  # [B, G]
    assert torch.equal(torch.bincount(per_block.flatten(), minlength=5)[1:], torch.full((4,), 12))
    assert torch.equal(batch["inv_weight"].view(16, 3, 4), (per_block / 4)[..., None].expand(16, 3, 4))


@pytest.mark.parametrize("bad", [{"t_max": 0.8}, {"min_rate": 0.1}, {"span_prob": 0.5}, {"noise": "random"}])
def test_count_draw_refuses_time_settings(bad):
    with pytest.raises(DifflmError, match="draw=count"):
        DiffusionConfig(draw="count", **bad)
    with pytest.raises(DifflmError, match="num_steps"):
        MaskedDiffusionObjective(DiffusionConfig(draw="count"), mask_token_id=MASK, vocab_size=3, num_steps=8)
