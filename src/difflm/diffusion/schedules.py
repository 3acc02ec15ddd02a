"""Noise schedules for masked diffusion: the masking rate p(t) and the ELBO weight p'(t) / p(t).

Time runs from t = 0 (clean) to t = 1 (fully masked). A schedule maps t to the probability p(t)
that a token is masked, with p(0) = 0, p(1) = 1 and p non-decreasing. The continuous-time ELBO of
masked diffusion weights the cross-entropy on masked tokens by p'(t) / p(t); for the linear
schedule that is LLaDA's 1/t. Weights are defined for t in (0, 1] (they diverge at t = 0, which is
why `sample_t` draws t >= eps) and are always computed in at least float32.

The BERT-prefix system does not use continuous time: it draws one rate per batch from a fixed
table (`DiscreteRates`) and weights by 1/p.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from difflm.errors import DifflmError


def _as_time(t: Tensor | float) -> Tensor:
    """t as a float tensor of at least float32 precision, clamped to [0, 1]."""
    t = torch.as_tensor(t)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype).clamp(0.0, 1.0)


class Schedule(ABC):
    """A masking-rate schedule. Subclasses give the closed forms `_rate` and `_weight`."""

    def rate(self, t: Tensor | float) -> Tensor:
        """Masking probability p(t), in [0, 1]."""
        return self._rate(_as_time(t)).clamp(0.0, 1.0)

    def weight(self, t: Tensor | float) -> Tensor:
        """ELBO weight p'(t) / p(t) for t in (0, 1]."""
        return self._weight(_as_time(t))

    @abstractmethod
    def _rate(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _weight(self, t: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """p(t) = t, weight 1/t (LLaDA)."""

    def _rate(self, t: Tensor) -> Tensor:
        return t.clone()

    def _weight(self, t: Tensor) -> Tensor:
        return 1.0 / t


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """p(t) = 1 - cos(pi t / 2): masks slowly at first, quickly near t = 1."""

    def _rate(self, t: Tensor) -> Tensor:
        # 1 - cos keeps p(1) exactly 1; its float32 cancellation near t = 0 costs ~1e-7 in absolute
        # rate, harmless for a masking probability (the weight below uses an exact closed form).
        return 1.0 - torch.cos(math.pi * t / 2.0)

    def _weight(self, t: Tensor) -> Tensor:
        # p' / p = (pi/2) sin(pi t/2) / (2 sin^2(pi t/4)) = (pi/2) cot(pi t/4).
        x = math.pi * t / 4.0
        return (math.pi / 2.0) * torch.cos(x) / torch.sin(x)


@dataclass(frozen=True)
class PowerSchedule(Schedule):
    """p(t) = t ** exponent, weight exponent / t."""

    exponent: float = 2.0

    def __post_init__(self) -> None:
        if not self.exponent > 0:
            raise DifflmError(f"power schedule exponent {self.exponent} must be > 0; pass e.g. exponent=2.0")

    def _rate(self, t: Tensor) -> Tensor:
        return t**self.exponent

    def _weight(self, t: Tensor) -> Tensor:
        return self.exponent / t


@dataclass(frozen=True)
class SigmoidSchedule(Schedule):
    """A sigmoid on [start, end] with temperature tau, rescaled so p(0) = 0 and p(1) = 1 exactly.

    p(t) = (s(x(t) / tau) - s(start / tau)) / (s(end / tau) - s(start / tau)),
    x(t) = start + (end - start) t, s the logistic function.
    """

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0

    def __post_init__(self) -> None:
        if not self.end > self.start:
            raise DifflmError(f"sigmoid schedule needs end > start, got start={self.start}, end={self.end}")
        if not self.tau > 0:
            raise DifflmError(f"sigmoid schedule tau {self.tau} must be > 0; pass e.g. tau=1.0")

    def _bounds(self) -> tuple[float, float]:
        lo = 1.0 / (1.0 + math.exp(-self.start / self.tau))
        hi = 1.0 / (1.0 + math.exp(-self.end / self.tau))
        return lo, hi

    def _rate(self, t: Tensor) -> Tensor:
        lo, hi = self._bounds()
        s = torch.sigmoid((self.start + (self.end - self.start) * t) / self.tau)
        return (s - lo) / (hi - lo)

    def _weight(self, t: Tensor) -> Tensor:
        lo, _ = self._bounds()
        s = torch.sigmoid((self.start + (self.end - self.start) * t) / self.tau)
        # d/dt s(x/tau) = s (1 - s) (end - start) / tau; the normaliser cancels in p' / p.
        return s * (1.0 - s) * ((self.end - self.start) / self.tau) / (s - lo)


@dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's log-linear noise: sigma(t) = -log(1 - (1 - eps) t), p = 1 - exp(-sigma) = (1 - eps) t.

    By design p(1) = 1 - eps (eps = 0 gives the linear schedule with p(1) = 1): a sliver of signal
    keeps sigma finite. The weight sigma'(t) / expm1(sigma(t)) simplifies to 1/t.
    """

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise DifflmError(f"loglinear schedule eps {self.eps} must be in [0, 1); pass e.g. eps=1e-3")

    def sigma(self, t: Tensor | float) -> Tensor:
        """Total noise sigma(t) (MDLM's time conditioning)."""
        return -torch.log1p(-(1.0 - self.eps) * _as_time(t))

    def _rate(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) * t

    def _weight(self, t: Tensor) -> Tensor:
        return 1.0 / t


SCHEDULES: dict[str, type[Schedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "power": PowerSchedule,
    "sigmoid": SigmoidSchedule,
    "loglinear": LogLinearSchedule,
}


def build_schedule(name: str, **params: float) -> Schedule:
    """The schedule registered under `name`, built with `params` (e.g. exponent=2.0 for power)."""
    if name not in SCHEDULES:
        raise DifflmError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise DifflmError(
            f"schedule {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(allowed) or 'none'}"
        )
    return cls(**params)


def discrete_table(schedule: Schedule, num_steps: int) -> Tensor:
    """Rates p(t_k) at t_k = k / num_steps for k = 0..num_steps, float32 [num_steps + 1]."""
    if num_steps < 1:
        raise DifflmError(f"num_steps {num_steps} must be >= 1")
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # [S + 1]
    return schedule.rate(t).to(torch.float32)


@dataclass(frozen=True)
class DiscreteRates:
    """A fixed table of masking rates, one drawn uniformly per batch (the BERT-prefix system).

    Every example in a batch gets the same rate; the ELBO weight is 1/p.
    """

    values: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

    def __post_init__(self) -> None:
        if len(self.values) == 0:
            raise DifflmError("DiscreteRates needs at least one rate, e.g. values=(1.0, 0.5)")
        bad = [v for v in self.values if not 0.0 < v <= 1.0]
        if bad:
            raise DifflmError(f"discrete rates {bad} outside (0, 1]; every rate must be in (0, 1]")
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))

    def draw(self, batch_size: int, generator: torch.Generator, device: torch.device | None = None) -> Tensor:
        """One rate drawn uniformly from the table, repeated for the batch: float32 [batch_size]."""
        idx = torch.randint(len(self.values), (1,), generator=generator, device=generator.device)
        rate = torch.tensor(self.values, dtype=torch.float32, device=generator.device)[idx]  # [1]
        return rate.expand(batch_size).clone().to(device or generator.device)

    def weight(self, rate: Tensor) -> Tensor:
        """ELBO weight 1/p, float32."""
        return 1.0 / rate.to(torch.float32)


def sample_t(
    batch_size: int,
    generator: torch.Generator,
    antithetic: bool = True,
    eps: float = 1e-3,
    device: torch.device | str | None = None,
    t_max: float = 1.0,
) -> Tensor:
    """Diffusion times in [eps, t_max], float32 [batch_size] (t_max < 1: BD3-LM's clipped schedule).

    antithetic=True draws one uniform u and sets u_i = (u + i / B) mod 1, so the batch holds exactly
    one time per 1/B-wide stratum of [eps, 1] (MDLM's low-discrepancy sampler): lower-variance
    loss estimates than iid draws at no cost.
    """
    if batch_size < 1:
        raise DifflmError(f"batch_size {batch_size} must be >= 1")
    if not 0.0 <= eps < 1.0:
        raise DifflmError(f"eps {eps} must be in [0, 1); the usual value is 1e-3")
    if not eps < t_max <= 1.0:
        raise DifflmError(f"t_max {t_max} must be in (eps={eps}, 1]")
    if antithetic:
        u0 = torch.rand(1, generator=generator, device=generator.device)  # [1]
        offsets = torch.arange(batch_size, device=generator.device) / batch_size  # [B]
        u = (u0 + offsets) % 1.0  # [B]
    else:
        u = torch.rand(batch_size, generator=generator, device=generator.device)  # [B]
    t = eps + (t_max - eps) * u
    return t.to(torch.float32).to(device or generator.device)
