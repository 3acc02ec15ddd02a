"""Schedules: endpoints, monotonicity, ELBO weight = p'/p, tables, time sampling."""

import math

import pytest
import torch

from difflm.diffusion.schedules import (
    SCHEDULES,
    DiscreteRates,
    LinearSchedule,
    LogLinearSchedule,
    PowerSchedule,
    build_schedule,
    discrete_table,
    sample_t,
)
from difflm.errors import DifflmError

ALL = [
    build_schedule("linear"),
    build_schedule("cosine"),
    build_schedule("power", exponent=0.5),
    build_schedule("power", exponent=3.0),
    build_schedule("sigmoid"),
    build_schedule("sigmoid", start=-1.0, end=4.0, tau=0.7),
    build_schedule("loglinear", eps=0.0),
]


def test_registry_covers_every_schedule():
    assert set(SCHEDULES) == {"linear", "cosine", "power", "sigmoid", "loglinear"}


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_endpoints_and_monotone(schedule):
    assert schedule.rate(0.0).item() == 0.0
    assert abs(schedule.rate(1.0).item() - 1.0) <= 1e-6
    p = schedule.rate(torch.linspace(0, 1, 1001))  # [1001]
    assert p.dtype == torch.float32
    assert bool((p[1:] >= p[:-1]).all())
    assert bool(((p >= 0) & (p <= 1)).all())


def test_cosine_and_linear_hit_one_exactly():
    assert build_schedule("cosine").rate(1.0).item() == 1.0
    assert build_schedule("linear").rate(1.0).item() == 1.0


def test_loglinear_keeps_eps_at_the_end():
    s = LogLinearSchedule(eps=1e-3)
    assert s.rate(1.0).item() == pytest.approx(1 - 1e-3, abs=1e-7)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    # p = 1 - exp(-sigma), the MDLM definition.
    torch.testing.assert_close(s.rate(t), 1 - torch.exp(-s.sigma(t)))


@pytest.mark.parametrize("schedule", [*ALL, LogLinearSchedule(eps=1e-3)], ids=repr)
def test_weight_is_derivative_over_rate(schedule):
    t = torch.linspace(0.02, 1.0, 50, dtype=torch.float64).requires_grad_(True)
    p = schedule.rate(t)
    (dp,) = torch.autograd.grad(p.sum(), t)
    expected = dp / p.detach()
    torch.testing.assert_close(schedule.weight(t.detach()), expected, rtol=1e-6, atol=1e-8)


def test_linear_weight_is_one_over_t_and_float32():
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.bfloat16)
    w = LinearSchedule().weight(t)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, 1.0 / t.float())


def test_build_schedule_errors():
    with pytest.raises(DifflmError, match="linear, cosine, power, sigmoid, loglinear"):
        build_schedule("quadratic")
    with pytest.raises(DifflmError, match="exponent"):
        build_schedule("power", power=2)
    with pytest.raises(DifflmError, match="> 0"):
        PowerSchedule(exponent=0.0)
    with pytest.raises(DifflmError, match="end > start"):
        build_schedule("sigmoid", start=1.0, end=0.0)


def test_discrete_table():
    table = discrete_table(PowerSchedule(exponent=2.0), 4)
    assert table.shape == (5,)
    assert table.tolist() == [0.0, 0.0625, 0.25, 0.5625, 1.0]
    cos = discrete_table(build_schedule("cosine"), 2)
    assert cos.tolist() == pytest.approx([0.0, 1 - math.cos(math.pi / 4), 1.0], abs=1e-7)
    with pytest.raises(DifflmError):
        discrete_table(LinearSchedule(), 0)


def test_discrete_rates_draw_one_rate_per_batch():
    rates = DiscreteRates((1.0, 0.5, 0.25))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        r = rates.draw(8, g)
        assert r.shape == (8,) and r.dtype == torch.float32
        assert bool((r == r[0]).all())
        seen.add(r[0].item())
    assert seen == {1.0, 0.5, 0.25}
    torch.testing.assert_close(rates.weight(torch.tensor([0.5, 0.25])), torch.tensor([2.0, 4.0]))
    assert torch.equal(
        rates.draw(4, torch.Generator().manual_seed(3)), rates.draw(4, torch.Generator().manual_seed(3))
    )
    with pytest.raises(DifflmError, match=r"outside \(0, 1\]"):
        DiscreteRates((0.5, 0.0))


def test_antithetic_times_are_stratified():
    eps, batch = 1e-3, 16
    for seed in range(5):
        t = sample_t(batch, torch.Generator().manual_seed(seed), antithetic=True, eps=eps)
        assert t.shape == (batch,) and t.dtype == torch.float32
        assert bool(((t >= eps) & (t <= 1.0)).all())
        bins = ((t.double() - eps) / (1 - eps) * batch).floor().long()
        assert sorted(bins.tolist()) == list(range(batch))


def test_iid_times_in_range_and_seeded():
    t = sample_t(1000, torch.Generator().manual_seed(1), antithetic=False, eps=0.1)
    assert bool(((t >= 0.1) & (t <= 1.0)).all())
    assert torch.equal(t, sample_t(1000, torch.Generator().manual_seed(1), antithetic=False, eps=0.1))
