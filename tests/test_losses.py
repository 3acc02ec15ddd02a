"""Losses against hand-computed values (math.log/exp, independent of torch's cross_entropy)."""

import math

import pytest
import torch

from difflm.diffusion.losses import LOSSES, elbo_loss, get_loss
from difflm.errors import DifflmError

# One sequence of 4 tokens over a vocabulary of 3; token id 2 doubles as the mask id.
ROWS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [1.0, 1.0, 1.0], [0.0, -2.0, 3.0]]
TARGETS = [0, 2, 1, 1]
NOISED = [True, False, True, True]
MASK_ID = 2
NOISY = [2, 2, 2, 2]  # position 1 is clean, but its token is the mask id


def _logp(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(v) for v in row))


def _ce(i: int) -> float:
    return -_logp(ROWS[i], TARGETS[i])


def _smooth_ce(i: int, eps: float = 0.1) -> float:
    """(1 - eps) * NLL + eps * mean over the vocabulary of -log p_k."""
    row = ROWS[i]
    return (1 - eps) * _ce(i) + eps * sum(-_logp(row, k) for k in range(3)) / 3


def _inputs(inv_weight: float = 0.25):
    logits = torch.tensor([ROWS])  # [1, 4, 3]
    return (
        logits,
        torch.tensor([TARGETS]),
        torch.tensor([NOISY]),
        torch.tensor([NOISED]),
        torch.tensor([inv_weight]),
    )


def test_hand_computed_values_are_what_we_think():
    # Spot-check the helper with numbers worked out on paper:
    # CE0 = log(e^2 + 1 + e^-1) - 2 = log(8.7569) - 2, CE2 = log 3, CE3 = log(1 + e^-2 + e^3) + 2.
    assert _ce(0) == pytest.approx(0.169846, abs=1e-6)
    assert _ce(2) == pytest.approx(math.log(3))
    assert _ce(3) == pytest.approx(5.054985, abs=1e-6)


def test_elbo_loss_hand_computed():
    logits, targets, _, noised, _ = _inputs()
    loss = elbo_loss(logits, targets, noised, torch.tensor([4.0]))
    expected = 4.0 * (_ce(0) + _ce(2) + _ce(3)) / 4
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_elbo_loss():
    loss = get_loss("elbo")(*_inputs(0.25), mask_token_id=MASK_ID)
    assert loss.item() == pytest.approx(4.0 * (_ce(0) + _ce(2) + _ce(3)) / (1 * 4), rel=1e-6)


def test_dllm_loss_uses_the_mask_id_not_the_noised_mask():
    loss = get_loss("dllm")(*_inputs(0.25), mask_token_id=MASK_ID)
    assert loss.item() == pytest.approx(4.0 * (_ce(0) + _ce(1) + _ce(2) + _ce(3)) / 4, rel=1e-6)


def test_soft_ce_loss():
    loss = get_loss("soft_ce")(*_inputs(0.5), mask_token_id=MASK_ID)
    expected = 2.0 * (_smooth_ce(0) + _smooth_ce(2) + _smooth_ce(3)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss_normalises_by_answer_length_per_example():
    logits, targets, noisy, _, _ = _inputs()
    logits = logits.expand(2, 4, 3)
    targets, noisy = targets.expand(2, 4), noisy.expand(2, 4)
    noised = torch.tensor([[True, False, True, True], [False, True, True, False]])
    loss_mask = torch.tensor([[False, True, True, True], [False, False, True, True]])  # answers: 3 and 2
    inv_weight = torch.tensor([0.25, 0.5])
    loss = get_loss("sft")(logits, targets, noisy, noised, inv_weight, mask_token_id=MASK_ID, loss_mask=loss_mask)
    # Example 0: position 0 is prompt, so positions 2, 3 count; example 1: position 1 is prompt.
    expected = (4.0 * (_ce(2) + _ce(3)) / 3 + 2.0 * _ce(2) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DifflmError, match="loss_mask"):
        get_loss("sft")(logits, targets, noisy, noised, inv_weight, mask_token_id=MASK_ID)


def test_reweight_cap_applied():
    loss = get_loss("elbo")(*_inputs(0.25), mask_token_id=MASK_ID, reweight_cap=2.0)
    assert loss.item() == pytest.approx(2.0 * (_ce(0) + _ce(2) + _ce(3)) / 4, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_logits_give_float32_loss(name):
    logits, targets, noisy, noised, inv_weight = _inputs()
    loss_mask = torch.ones(1, 4, dtype=torch.bool)
    fn = get_loss(name)
    low = fn(logits.bfloat16(), targets, noisy, noised, inv_weight, mask_token_id=MASK_ID, loss_mask=loss_mask)
    ref = fn(
        logits.bfloat16().float(), targets, noisy, noised, inv_weight, mask_token_id=MASK_ID, loss_mask=loss_mask
    )
    assert low.dtype == torch.float32
    assert low.item() == ref.item()


def test_gradient_only_reaches_noised_positions():
    logits, targets, _, noised, _ = _inputs()
    logits.requires_grad_(True)
    elbo_loss(logits, targets, noised, torch.tensor([4.0])).backward()
    touched = logits.grad.abs().sum(-1)[0] > 0  # [4]
    assert touched.tolist() == NOISED


def test_nothing_noised_gives_zero_with_a_graph():
    logits, targets, _, _, _ = _inputs()
    logits.requires_grad_(True)
    loss = elbo_loss(logits, targets, torch.zeros(1, 4, dtype=torch.bool), torch.tensor([4.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum().item() == 0.0


def test_errors():
    logits, targets, _, noised, _ = _inputs()
    with pytest.raises(DifflmError, match="elbo, dllm, soft_ce, sft"):
        get_loss("mse")
    with pytest.raises(DifflmError, match="tokens, answer"):
        elbo_loss(logits, targets, noised, torch.ones(1), normalize="batch")
    with pytest.raises(DifflmError, match="loss_mask"):
        elbo_loss(logits, targets, noised, torch.ones(1), normalize="answer")
    with pytest.raises(DifflmError, match="weight shape"):
        elbo_loss(logits, targets, noised, torch.ones(2))
    with pytest.raises(DifflmError, match="targets shape"):
        elbo_loss(logits, targets[:, :3], noised, torch.ones(1))


# ----------------------------------------------------------------------------- SUBS (MDLM)


def _subs_ce(i: int) -> float:
    """-log p(target) with the mask token (id 2) removed from the softmax."""
    row = ROWS[i]
    return -(row[TARGETS[i]] - math.log(sum(math.exp(v) for k, v in enumerate(row) if k != MASK_ID)))


def test_mdlm_loss_is_subs_by_hand_and_tighter():
    loss = get_loss("mdlm")(*_inputs(0.25), mask_token_id=MASK_ID)
    expected = 4.0 * (_subs_ce(0) + _subs_ce(2) + _subs_ce(3)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() < get_loss("elbo")(*_inputs(0.25), mask_token_id=MASK_ID).item()


def test_subs_equals_mdlm_parameterisation():
    """MDLM's _subs_parameterization (mask logit += -inf, then log-softmax), re-derived, on random tensors."""
    g = torch.Generator().manual_seed(0)
    B, L, V, mask = 3, 16, 50, 49
    logits = torch.randn(B, L, V, generator=g) * 3
    targets = torch.randint(0, V - 1, (B, L), generator=g)
    noised = torch.rand(B, L, generator=g) < 0.5
    inv_weight = torch.rand(B, generator=g).clamp(min=0.1)
    noisy = torch.where(noised, mask, targets)
    log_p = logits.clone()
    log_p[:, :, mask] += float("-inf")
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    nll = -log_p.gather(-1, targets[..., None])[..., 0]  # [B, L]
    expected = (nll * noised / inv_weight[:, None]).sum() / (B * L)
    got = get_loss("mdlm")(logits, targets, noisy, noised, inv_weight, mask_token_id=mask)
    torch.testing.assert_close(got, expected)
    assert got < get_loss("elbo")(logits, targets, noisy, noised, inv_weight, mask_token_id=mask)


def test_subs_gradient_never_reaches_the_mask_logit():
    logits, targets, noisy, noised, inv_weight = _inputs()
    logits.requires_grad_(True)
    get_loss("mdlm")(logits, targets, noisy, noised, inv_weight, mask_token_id=MASK_ID).backward()
    assert logits.grad[..., MASK_ID].abs().sum().item() == 0.0
    assert logits.grad[..., :MASK_ID].abs().sum().item() > 0


def test_subs_errors():
    logits, targets, _, noised, _ = _inputs()
    with pytest.raises(DifflmError, match="use SUBS or smoothing"):
        elbo_loss(logits, targets, noised, torch.ones(1), banned_id=MASK_ID, label_smoothing=0.1)
    with pytest.raises(DifflmError, match="target equals the banned"):
        elbo_loss(logits, targets, torch.ones(1, 4, dtype=torch.bool), torch.ones(1), banned_id=MASK_ID)


def test_eval_reports_the_subs_bound(mock_denoiser):
    """`difflm eval`'s elbo_nll is the SUBS bound, below the plain-softmax one on the same draws."""
    from difflm.config import DiffusionConfig
    from difflm.evaluate.likelihood import elbo_nll, mean_objective_loss
    from difflm.train.objectives import MaskedDiffusionObjective

    model = mock_denoiser(vocab=32, seed=1)
    data = [torch.randint(0, 31, (12,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    kw = dict(batch_size=4, samples=2, seed=0, progress=False)

    def bound(loss: str) -> float:
        task = MaskedDiffusionObjective(DiffusionConfig(loss=loss), mask_token_id=31, vocab_size=32)
        return mean_objective_loss(model, task, data, **kw)

    got = elbo_nll(model, data, mask_token_id=31, vocab_size=32, **kw)
    assert got == bound("mdlm") and got < bound("elbo")


def test_decode_block_objective_scores_one_block_seen_as_a_decoder_sees_it():
    """diffusion.decode_block: clean text before the row's block, masks after it, the loss on the
    block's noised tokens only; block diffusion and decode_block are refused together."""
    from difflm.config import DiffusionConfig
    from difflm.errors import DifflmError
    from difflm.train.objectives import MaskedDiffusionObjective

    task = MaskedDiffusionObjective(DiffusionConfig(decode_block=4), mask_token_id=31, vocab_size=32)
    ids = torch.randint(0, 31, (32, 12), generator=torch.Generator().manual_seed(0))
    batch = task.prepare({"input_ids": ids}, torch.Generator().manual_seed(1))
    scored, noised, noisy = batch["loss_mask"], batch["noised"], batch["noisy"]
    assert bool((scored.sum(1) == 4).all()) and bool((noised & ~scored).sum() == 0)
    for b in range(len(ids)):
        lo = int(scored[b].nonzero()[0])
        assert torch.equal(noisy[b, :lo], ids[b, :lo]) and bool((noisy[b, lo + 4 :] == 31).all())
        assert torch.equal(noised[b, lo : lo + 4], noisy[b, lo : lo + 4] == 31)
    refused = ({"block_length": 4}, {"random_length_prob": 0.01}, {"decode_block": None, "decode_offset": 2})
    for bad in refused:
        with pytest.raises(DifflmError, match="decode_block"):
            DiffusionConfig(**{"decode_block": 4, **bad})
