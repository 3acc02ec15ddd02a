"""Gaussian diffusion maths for Diffusion Forcing: schedules, corruption, SNR loss weights, DDIM.

This is the one continuous family in difflm (see docs/architecture.md): tokens live in embedding
space and every token of a sequence carries its own integer noise level `k`.

Level convention (the one exception to the project's continuous `t in [0, 1]`):
  - training levels are `k in {0, ..., T-1}` (T = `timesteps`), 0 = least noisy;
  - `k = -1` means clean (`alpha_bar = 1`): every lookup below accepts it, so a DDIM step to -1
    returns the predicted x0 and `q_sample` at -1 returns x0;
  - samplers walk the grid `level_grid = linspace(-1, T-1, S+1)` (S = sampling_timesteps), taken in
    float32 and truncated toward zero as the reference code does (not rounded), indexed by 0..S,
    where index 0 is clean and index S is pure noise;
  - clean context tokens are fed to the model at level `stabilization_level - 1`, as the reference
    sampler does (`context_level`).

Lookup tables are computed in float64 and stored in float32, as in the reference: an SNR or a
square root taken from a float32 alpha_bar loses up to 5e-4 relative where 1 - alpha_bar cancels.

Torch only: no model, no sampler. `GaussianDiffusion` is an `nn.Module` only so that `.to(device)`
moves its lookup tables; the tables are non-persistent buffers, so checkpoints never hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.errors import DifflmError
from difflm.fields import opt

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
LOSS_WEIGHTINGS = ("none", "min_snr", "fused_snr")


@dataclass
class GaussianConfig:
    timesteps: int = opt(1000, "Number of training noise levels T (levels 0..T-1).")
    beta_schedule: str = opt("cosine", "Noise schedule of the betas.", BETA_SCHEDULES)
    objective: str = opt(
        "pred_x0", "What the network predicts: the noise, the clean embedding x0, or v.", OBJECTIVES
    )
    loss_weighting: str = opt(
        "fused_snr",
        "Per-token loss weight: none, min-SNR, or Diffusion Forcing's fused (causal, cumulative) SNR.",
        LOSS_WEIGHTINGS,
    )
    snr_clip: float = opt(5.0, "SNR cap of the min-SNR / fused-SNR weightings.")
    cum_snr_decay: float = opt(0.96, "Decay in (0, 1] of the running SNR of earlier tokens (fused_snr).")
    clip_noise: float = opt(20.0, "Gaussian noise is clamped to +-clip_noise.")
    sampling_timesteps: int = opt(50, "Denoising steps S at sampling (S = T gives DDPM, S < T DDIM).")
    ddim_eta: float = opt(0.0, "DDIM stochasticity (0 = deterministic); ignored for DDPM (S = T).")
    stabilization_level: int = opt(
        10, "Clean context tokens are fed to the model at level stabilization_level - 1 (1..T)."
    )
    rounding_weight: float = opt(
        1.0, "Weight of the auxiliary rounding cross-entropy (predicted x0 -> tokens)."
    )
    snr_scale: float = opt(
        1.0, "Multiply the SNR of every level by this (< 1: a noisier schedule; see GaussianDiffusion)."
    )

    def __post_init__(self) -> None:
        for name, choices in (
            ("beta_schedule", BETA_SCHEDULES),
            ("objective", OBJECTIVES),
            ("loss_weighting", LOSS_WEIGHTINGS),
        ):
            if getattr(self, name) not in choices:
                raise DifflmError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(choices)}")
        if self.timesteps < 2:
            raise DifflmError(f"timesteps must be >= 2, got {self.timesteps}")
        if not 1 <= self.sampling_timesteps <= self.timesteps:
            raise DifflmError(
                f"sampling_timesteps {self.sampling_timesteps} > timesteps {self.timesteps}"
                if self.sampling_timesteps > self.timesteps
                else f"sampling_timesteps must be >= 1, got {self.sampling_timesteps}"
            )
        if not 0.0 < self.cum_snr_decay <= 1.0:
            raise DifflmError(f"cum_snr_decay must be in (0, 1], got {self.cum_snr_decay}")
        if self.snr_clip <= 0 or self.clip_noise <= 0:
            raise DifflmError(
                f"snr_clip and clip_noise must be > 0, got {self.snr_clip} and {self.clip_noise}"
            )
        if not 1 <= self.stabilization_level <= self.timesteps:
            raise DifflmError(
                f"stabilization_level {self.stabilization_level} must be in [1, timesteps={self.timesteps}]"
                " (context is fed at stabilization_level - 1)"
            )
        if self.snr_scale <= 0:
            raise DifflmError(f"snr_scale must be > 0, got {self.snr_scale}")
        if self.ddim_eta < 0 or self.rounding_weight < 0:
            raise DifflmError(
                f"ddim_eta and rounding_weight must be >= 0, got {self.ddim_eta}, {self.rounding_weight}"
            )


def make_betas(schedule: str, timesteps: int) -> Tensor:
    """Betas [T] in float64, clipped to at most 0.999 so that no alpha reaches 0."""
    if schedule == "linear":  # DDPM's 1e-4..0.02 for T = 1000, rescaled for other T
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)  # [T+1]
    if schedule == "cosine":  # Nichol & Dhariwal, offset s = 0.008
        s = 0.008
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    elif schedule == "sigmoid":  # Jabri et al., start -3, end 3, tau 1
        lo, hi = torch.sigmoid(torch.tensor([-3.0, 3.0], dtype=torch.float64))
        alpha_bar = (hi - torch.sigmoid(6 * t - 3)) / (hi - lo)
    else:
        raise DifflmError(f"unknown beta_schedule {schedule!r}; choose from {', '.join(BETA_SCHEDULES)}")
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)  # [T]


class GaussianDiffusion(nn.Module):
    """Lookup tables and the per-token Gaussian maths; every `k` is a LongTensor of levels in [-1, T-1].

    `snr_scale` s shifts the schedule: SNR'(k) = s SNR(k), i.e. alpha_bar' = s a / (1 - a + s a).
    Tokens embedded in D dimensions stay recoverable from their own noisy embedding until the SNR
    is far below 1 (at D = 128, up to alpha_bar ~ 0.1 under the cosine schedule), so most levels
    teach nothing about context; s < 1 moves that boundary toward the middle of the schedule, as
    simple diffusion (Hoogeboom et al., 2023) shifts the schedule for large images.
    """

    alpha_bar_ext: Tensor  # [T+1]: alpha_bar at levels -1..T-1 (index k + 1)
    sqrt_alpha_bar_ext: Tensor  # [T+1]: sqrt(alpha_bar), same indexing
    sqrt_one_minus_ext: Tensor  # [T+1]: sqrt(1 - alpha_bar), same indexing
    snr_table: Tensor  # [T]: alpha_bar / (1 - alpha_bar) at levels 0..T-1
    level_grid: Tensor  # [S+1]: real level of each sampler index 0..S

    def __init__(self, config: GaussianConfig) -> None:
        super().__init__()
        self.config = config
        T, S = config.timesteps, config.sampling_timesteps
        alpha_bar = torch.cumprod(1 - make_betas(config.beta_schedule, T), dim=0)  # [T] float64
        if config.snr_scale != 1:
            s = config.snr_scale
            alpha_bar = s * alpha_bar / (1 - alpha_bar + s * alpha_bar)
        ext = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])  # [T+1]
        tables = {
            "alpha_bar_ext": ext,
            "sqrt_alpha_bar_ext": ext.sqrt(),
            "sqrt_one_minus_ext": (1 - ext).sqrt(),
            "snr_table": alpha_bar / (1 - alpha_bar),
        }
        for name, table in tables.items():  # float64 maths, float32 storage
            self.register_buffer(name, table.float(), persistent=False)
        grid = torch.linspace(-1, T - 1, S + 1, dtype=torch.float32).long()  # [S+1], truncated
        self.register_buffer("level_grid", grid, persistent=False)

    # ------------------------------------------------------------------ lookups

    def alpha_bar(self, k: Tensor) -> Tensor:
        """alpha_bar at levels k (same shape as k; 1 at k = -1)."""
        return self.alpha_bar_ext[k + 1]

    def snr(self, k: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at levels k >= 0."""
        return self.snr_table[k]

    def _coefs(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar), sqrt(1 - alpha_bar) shaped [..., 1] to broadcast over the embedding dim."""
        return self.sqrt_alpha_bar_ext[k + 1][..., None], self.sqrt_one_minus_ext[k + 1][..., None]

    @property
    def context_level(self) -> int:
        """Level fed to the model for clean context tokens: stabilization_level - 1 (the reference's)."""
        return self.config.stabilization_level - 1

    @property
    def sampling_eta(self) -> float:
        """eta used by samplers: 1 when S = T, which makes the DDIM step exactly the DDPM ancestral step."""
        cfg = self.config
        return 1.0 if cfg.sampling_timesteps == cfg.timesteps else cfg.ddim_eta

    def randn(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
        """Standard normal noise clamped to +-clip_noise, drawn on the generator's device."""
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return noise.clamp(-self.config.clip_noise, self.config.clip_noise).to(device)

    # ------------------------------------------------------------------ corruption and conversions

    def q_sample(self, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """x_k = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise, per token.  x0 [B, L, D], k [B, L]."""
        noise = noise.clamp(-self.config.clip_noise, self.config.clip_noise)
        sa, s1a = self._coefs(k)  # [B, L, 1]
        return sa * x0 + s1a * noise  # [B, L, D]

    def v_target(self, x0: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        sa, s1a = self._coefs(k)
        return sa * noise - s1a * x0

    def x0_from_eps(self, x_t: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        sa, s1a = self._coefs(k)
        return (x_t - s1a * eps) / sa

    def eps_from_x0(self, x_t: Tensor, k: Tensor, x0: Tensor) -> Tensor:
        """Noise implied by x0.  Undefined at k = -1 (no noise); callers never step such tokens."""
        sa, s1a = self._coefs(k)
        return (x_t - sa * x0) / s1a.clamp(min=1e-12)

    def split_prediction(self, pred: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Network output in the objective's space -> (x0_hat, eps_hat), both [B, L, D]."""
        objective = self.config.objective
        if objective == "pred_noise":
            eps = pred.clamp(-self.config.clip_noise, self.config.clip_noise)
            return self.x0_from_eps(x_t, k, eps), eps
        if objective == "pred_x0":
            x0 = pred
        else:  # pred_v: x0 = sqrt(a) x_t - sqrt(1 - a) v
            sa, s1a = self._coefs(k)
            x0 = sa * x_t - s1a * pred
        return x0, self.eps_from_x0(x_t, k, x0)

    # ------------------------------------------------------------------ loss

    def loss_weights(self, k: Tensor) -> Tensor:
        """Per-token loss weights [B, L] for levels k [B, L] (see `fused_snr_weights` for fused_snr)."""
        cfg = self.config
        if cfg.loss_weighting == "none":
            return torch.ones_like(k, dtype=self.alpha_bar_ext.dtype)
        if cfg.loss_weighting == "fused_snr":
            return self.fused_snr_weights(self.snr(k))
        snr = self.snr(k)
        return snr_to_weight(snr.clamp(max=cfg.snr_clip), snr, cfg.objective)

    def fused_snr_weights(self, snr: Tensor) -> Tensor:
        """Diffusion Forcing's fused min-SNR weights [B, L] from per-token SNRs [B, L].

        A token whose predecessors are clean is easier than its own SNR says, so its effective SNR
        is fused with a running, decayed summary of the SNRs before it (causal, along dim 1):

          n_i   = min(snr_i, c) / c                  normalised clipped SNR in [0, 1]  (c = snr_clip)
          r_0   = n_0,  r_i = d r_{i-1} + (1 - d) n_i  running SNR (d = cum_snr_decay)
          p_i   = r_{i-1} for i >= 1, p_0 = 0         shifted by one: only strictly earlier tokens
          f~_i  = 1 - (1 - d p_i)(1 - n_i)            fused clipped SNR (a probabilistic "or")
          f_i   = 1 - (1 - d p_i)(1 - snr_i / c)      fused unclipped SNR

        and the objective's min-SNR weight is taken with c f~ as the clipped and c f as the plain SNR:
        pred_noise f~/f, pred_x0 c f~, pred_v c f~ / (c f + 1).
        """
        c, d = self.config.snr_clip, self.config.cum_snr_decay
        n_clip = snr.clamp(max=c) / c  # [B, L]
        L = snr.shape[1]
        # r = n_clip @ M^T with M[i, j] = d^(i-j) * (1 if j == 0 else 1 - d) for j <= i: the recursion unrolled
        i = torch.arange(L, device=snr.device)
        powers = (i[:, None] - i[None, :]).clamp(min=0).to(snr.dtype)  # [L, L]
        decay = torch.tensor(d, dtype=snr.dtype, device=snr.device).pow(powers)
        gain = torch.full((L,), 1.0 - d, dtype=snr.dtype, device=snr.device)  # [L] over j
        gain[0] = 1.0
        M = torch.tril(decay * gain[None, :])  # [L, L]
        running = n_clip @ M.T  # [B, L]
        prior = F.pad(running[:, :-1], (1, 0), value=0.0)  # [B, L]
        keep = 1 - d * prior
        fused_clipped = 1 - keep * (1 - n_clip)
        fused = 1 - keep * (1 - snr / c)
        return snr_to_weight(c * fused_clipped, c * fused, self.config.objective)

    def training_loss(
        self, pred: Tensor, x0: Tensor, noise: Tensor, k: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Weighted MSE of the objective's prediction: mean over D, weighted per token, masked mean over tokens.

        pred, x0, noise [B, L, D]; k [B, L]; mask [B, L] (1 = count the token) or None.
        """
        noise = noise.clamp(-self.config.clip_noise, self.config.clip_noise)
        objective = self.config.objective
        if objective == "pred_noise":
            target = noise
        elif objective == "pred_x0":
            target = x0
        else:
            target = self.v_target(x0, noise, k)
        per_token = (pred - target).pow(2).mean(-1) * self.loss_weights(k)  # [B, L]
        if mask is None:
            return per_token.mean()
        mask = mask.to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    # ------------------------------------------------------------------ sampling

    def ddim_update(
        self,
        x_t: Tensor,
        x0: Tensor,
        eps: Tensor,
        k_from: Tensor,
        k_to: Tensor,
        eta: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One DDIM step from levels k_from to k_to (per token) given x0_hat and eps_hat.

        x_next = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a/a') (1 - a') / (1 - a)).  Tokens with k_from == k_to are returned as is.
        """
        a = self.alpha_bar(k_from)[..., None]  # [B, L, 1]
        a_next = self.alpha_bar(k_to)[..., None]
        var = (1 - a / a_next) * (1 - a_next) / (1 - a).clamp(min=1e-12)
        sigma = eta * var.clamp(min=0).sqrt()
        c = (1 - a_next - sigma**2).clamp(min=0).sqrt()
        x_next = a_next.sqrt() * x0 + c * eps  # [B, L, D]
        if eta > 0:
            if generator is None:
                raise DifflmError("a stochastic step (eta > 0 or DDPM) needs a torch.Generator")
            x_next = x_next + sigma * self.randn(tuple(x_t.shape), generator, x_t.device)
        return torch.where((k_from == k_to)[..., None], x_t, x_next)

    def ddim_step(
        self,
        x_t: Tensor,
        k_from: Tensor,
        k_to: Tensor,
        pred: Tensor,
        eta: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM step from the network output `pred` (objective space); k_to = -1 steps to clean."""
        x0, eps = self.split_prediction(pred, x_t, k_from)
        return self.ddim_update(x_t, x0, eps, k_from, k_to, eta, generator)


def snr_to_weight(clipped_snr: Tensor, snr: Tensor, objective: str) -> Tensor:
    """Min-SNR weight for an objective: eps-loss clipped/snr, x0-loss clipped, v-loss clipped/(snr+1)."""
    if objective == "pred_noise":
        return clipped_snr / snr.clamp(min=1e-12)
    if objective == "pred_x0":
        return clipped_snr
    if objective == "pred_v":
        return clipped_snr / (snr + 1)
    raise DifflmError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
