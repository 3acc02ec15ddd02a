"""Gaussian diffusion maths of Diffusion Forcing: config checks, schedules, weights, DDIM/DDPM steps."""

import math

import pytest
import torch

from difflm.diffusion.gaussian import GaussianConfig, GaussianDiffusion, make_betas
from difflm.errors import DifflmError

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def make(**kw) -> GaussianDiffusion:
    kw.setdefault("stabilization_level", min(10, kw.get("timesteps", 1000) - 1))
    return GaussianDiffusion(GaussianConfig(**kw))


def data(shape=(2, 5, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timesteps": 10, "sampling_timesteps": 20}, "sampling_timesteps 20 > timesteps 10"),
        ({"objective": "pred_eps"}, "unknown objective 'pred_eps'"),
        ({"beta_schedule": "quadratic"}, "unknown beta_schedule"),
        ({"loss_weighting": "p2"}, "unknown loss_weighting"),
        ({"cum_snr_decay": 0.0}, "cum_snr_decay must be in (0, 1]"),
        ({"cum_snr_decay": 1.5}, "cum_snr_decay must be in (0, 1]"),
        ({"timesteps": 10, "stabilization_level": 11, "sampling_timesteps": 5}, "stabilization_level 11"),
        ({"timesteps": 10, "stabilization_level": 0, "sampling_timesteps": 5}, "stabilization_level 0"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(
        DifflmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        GaussianConfig(**kwargs)


def test_cum_snr_decay_one_is_allowed():
    assert GaussianConfig(cum_snr_decay=1.0).cum_snr_decay == 1.0


def test_context_level_is_stabilization_level_minus_one():
    """The reference feeds clean context at stabilization_level - 1; T is allowed (level T - 1)."""
    assert make(timesteps=10, sampling_timesteps=5, stabilization_level=1).context_level == 0
    assert make(timesteps=10, sampling_timesteps=5, stabilization_level=10).context_level == 9


# ----------------------------------------------------------------------------- schedules and grid


def test_cosine_alpha_bar_matches_formula():
    diff = make(beta_schedule="cosine")
    s, T = 0.008, 1000

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for k in (0, 1, 10, 500):  # unclipped region: alpha_bar_k = f(k + 1) / f(0)
        assert diff.alpha_bar(torch.tensor(k)).item() == pytest.approx(f(k + 1) / f(0), rel=1e-5)
    assert diff.alpha_bar(torch.tensor(-1)).item() == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [10, 1000])
def test_betas_valid_and_alpha_bar_decreasing(schedule, T):
    betas = make_betas(schedule, T)
    assert betas.shape == (T,) and (betas >= 0).all() and (betas <= 0.999).all()
    alpha_bar = make(beta_schedule=schedule, timesteps=T, sampling_timesteps=T).alpha_bar_ext
    assert (alpha_bar[1:] < alpha_bar[:-1]).all() and alpha_bar[-1] > 0


def test_level_grid():
    """float32 linspace truncated toward zero, as the reference's sample_step builds it."""
    assert make(timesteps=10, sampling_timesteps=5).level_grid.tolist() == [-1, 1, 3, 5, 7, 9]
    assert make(timesteps=10, sampling_timesteps=3).level_grid.tolist() == [-1, 2, 5, 9]  # -1, 2.33, 5.67, 9
    assert make(timesteps=4, sampling_timesteps=4).level_grid.tolist() == [-1, 0, 1, 2, 3]
    assert make(timesteps=4, sampling_timesteps=3).level_grid.tolist() == [-1, 0, 1, 3]  # -1, 0.33, 1.67, 3


@pytest.mark.parametrize("S", [64, 128, 256])
def test_level_grid_matches_the_reference_at_T_1000(S):
    """The rounded float64 grid differed from the reference in 28 / 60 / 124 entries here."""
    reference = torch.linspace(-1, 999, steps=S + 1).long()  # float32 default dtype, truncated
    assert torch.equal(make(timesteps=1000, sampling_timesteps=S).level_grid, reference)


# ----------------------------------------------------------------------------- corruption, conversions


def test_q_sample_endpoints_and_clamp():
    diff = make()
    x0, noise = data()
    k = torch.zeros(2, 5, dtype=torch.long)
    torch.testing.assert_close(diff.q_sample(x0, k, noise), x0, atol=2e-2, rtol=0)
    torch.testing.assert_close(diff.q_sample(x0, k + 999, noise), noise, atol=1e-3, rtol=0)
    assert torch.equal(diff.q_sample(x0, k - 1, noise), x0)  # -1 = clean
    big = torch.full_like(noise, 100.0)
    torch.testing.assert_close(
        diff.q_sample(x0, k + 999, big), torch.full_like(noise, 20.0), atol=1e-2, rtol=0
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_prediction_conversions_round_trip(objective):
    diff = make(objective=objective)
    x0, noise = data()
    k = torch.tensor([[0, 50, 200, 400, 600]]).expand(2, 5)
    x_t = diff.q_sample(x0, k, noise)
    target = {"pred_noise": noise, "pred_x0": x0, "pred_v": diff.v_target(x0, noise, k)}[objective]
    x0_hat, eps_hat = diff.split_prediction(target, x_t, k)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-3, rtol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ddim_eta0_from_true_noise_recovers_x0(objective):
    diff = make(objective=objective)
    x0, noise = data()
    k = torch.tensor([[0, 100, 300, 450, 500]]).expand(2, 5)
    x_t = diff.q_sample(x0, k, noise)
    target = {"pred_noise": noise, "pred_x0": x0, "pred_v": diff.v_target(x0, noise, k)}[objective]
    clean = diff.ddim_step(x_t, k, torch.full_like(k, -1), target, eta=0.0)
    torch.testing.assert_close(clean, x0, atol=1e-5, rtol=0)
    # deterministic DDIM keeps the noise: stepping k -> k' lands on q_sample(x0, k', same noise)
    mid = diff.ddim_step(x_t, k, k // 2, target, eta=0.0)
    torch.testing.assert_close(mid, diff.q_sample(x0, k // 2, noise), atol=1e-5, rtol=0)


def test_ddim_step_leaves_unchanged_levels_untouched():
    diff = make()
    x0, noise = data()
    k = torch.tensor([[5, 5, 300, -1, 999]]).expand(2, 5)
    k_to = torch.tensor([[5, 2, 300, -1, 500]]).expand(2, 5)
    x_t = diff.q_sample(x0, k, noise)
    out = diff.ddim_step(
        x_t, k, k_to, torch.randn_like(x0), eta=0.5, generator=torch.Generator().manual_seed(1)
    )
    same = (k == k_to)[..., None].expand_as(x_t)
    assert torch.equal(out[same], x_t[same]) and not torch.equal(out[~same], x_t[~same])


def test_ddpm_when_sampling_timesteps_equals_timesteps():
    """S = T: eta becomes 1 and one step k -> k-1 is the DDPM posterior mean plus its std times z."""
    diff = make(timesteps=50, sampling_timesteps=50, objective="pred_x0")
    assert diff.sampling_eta == 1.0 and make(ddim_eta=0.3).sampling_eta == 0.3
    x0, noise = data()
    k = torch.full((2, 5), 20)
    x_t = diff.q_sample(x0, k, noise)
    out = diff.ddim_step(x_t, k, k - 1, x0, diff.sampling_eta, torch.Generator().manual_seed(7))
    z = diff.randn(tuple(x0.shape), torch.Generator().manual_seed(7), x0.device)
    a, a_prev = diff.alpha_bar(torch.tensor(20)).item(), diff.alpha_bar(torch.tensor(19)).item()
    beta = 1 - a / a_prev
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
    std = math.sqrt(beta * (1 - a_prev) / (1 - a))
    torch.testing.assert_close(out, mean + std * z, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weights(objective):
    diff = make(objective=objective, loss_weighting="min_snr", snr_clip=5.0)
    k = torch.tensor([[0, 100, 400, 900]])
    got = diff.loss_weights(k)[0].tolist()
    for snr, w in zip(diff.snr(k)[0].tolist(), got, strict=True):
        clipped = min(snr, 5.0)
        expected = {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}[objective]
        assert w == pytest.approx(expected, rel=1e-5)
    assert make(loss_weighting="none").loss_weights(k).tolist() == [[1.0] * 4]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("decay", [0.9, 1.0])
def test_fused_snr_weights_by_hand(objective, decay):
    c = 5.0
    snr = [10.0, 2.0, 0.5, 7.0]
    # normalised clipped SNR
    n = [min(s, c) / c for s in snr]  # [1.0, 0.4, 0.1, 1.0]
    # running SNR: r0 = n0, r_i = d r_{i-1} + (1 - d) n_i
    r = [n[0]]
    for i in range(1, 4):
        r.append(decay * r[-1] + (1 - decay) * n[i])
    # shifted by one: token i sees only tokens before it
    prior = [0.0, r[0], r[1], r[2]]
    expected = []
    for i in range(4):
        keep = 1 - decay * prior[i]
        fused_clipped = 1 - keep * (1 - n[i])
        fused = 1 - keep * (1 - snr[i] / c)
        expected.append(
            {
                "pred_noise": fused_clipped / fused,
                "pred_x0": fused_clipped * c,
                "pred_v": fused_clipped * c / (fused * c + 1),
            }[objective]
        )
    diff = make(objective=objective, loss_weighting="fused_snr", snr_clip=c, cum_snr_decay=decay)
    got = diff.fused_snr_weights(torch.tensor([snr], dtype=torch.float64))[0].tolist()
    assert got == pytest.approx(expected, rel=1e-12)
    # the first token has no prior: its weight is the plain min-SNR weight
    plain = {"pred_noise": 5.0 / 10.0, "pred_x0": 5.0, "pred_v": 5.0 / 11.0}[objective]
    assert got[0] == pytest.approx(plain, rel=1e-12)


def test_fused_snr_via_loss_weights_uses_levels():
    diff = make(loss_weighting="fused_snr")
    k = torch.tensor([[3, 700, 20, 999, 0]])
    torch.testing.assert_close(diff.loss_weights(k), diff.fused_snr_weights(diff.snr(k)))


def test_training_loss_by_hand():
    diff = make(objective="pred_x0", loss_weighting="none")
    x0, noise = data((1, 3, 4))
    k = torch.tensor([[1, 2, 3]])
    assert diff.training_loss(x0, x0, noise, k).item() == 0.0
    pred = x0.clone()
    pred[0, 0] += 2.0  # squared error 4 on token 0 only
    assert diff.training_loss(pred, x0, noise, k).item() == pytest.approx(4 / 3)
    mask = torch.tensor([[1, 1, 0]])
    assert diff.training_loss(pred, x0, noise, k, mask).item() == pytest.approx(4 / 2)


def _reference_weights(snr: torch.Tensor, objective: str, fused: bool, c: float = 5.0, d: float = 0.96):
    """The reference recipe: float64 SNR table cast to float32, then float32 maths (fused: its loop)."""
    clipped = snr.clamp(max=c)
    if not fused:
        return {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}[objective]
    n_clip, n = clipped / c, snr / c
    running = [n_clip[:, 0]]
    for i in range(1, snr.shape[1]):
        running.append(d * running[-1] + (1 - d) * n_clip[:, i])
    prior = torch.stack([torch.zeros_like(running[0]), *running[:-1]], dim=1)
    fc, f = 1 - (1 - d * prior) * (1 - n_clip), 1 - (1 - d * prior) * (1 - n)
    return {"pred_noise": fc / f, "pred_x0": fc * c, "pred_v": fc * c / (f * c + 1)}[objective]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", ["min_snr", "fused_snr"])
def test_loss_weights_match_float64_tables(objective, weighting):
    """SNRs come from float64 tables: float32 ones put pred_noise / pred_v weights 5e-4 relative off."""
    diff = make(objective=objective, loss_weighting=weighting)  # cosine, T = 1000
    a = torch.cumprod(1 - make_betas("cosine", 1000), dim=0)  # float64
    k = torch.arange(1000)[None]  # every level, as one sequence
    snr = (a / (1 - a)).float()[k]
    assert torch.equal(diff.snr(k), snr)
    expected = _reference_weights(snr, objective, fused=weighting == "fused_snr")
    if weighting == "min_snr":
        assert torch.equal(diff.loss_weights(k), expected)
    else:  # same maths, unrolled recursion vs loop: float32 rounding only (both ~7e-5 from exact)
        torch.testing.assert_close(diff.loss_weights(k), expected, rtol=3e-5, atol=0)


def test_q_sample_coefficients_come_from_float64():
    """sqrt(1 - alpha_bar) is up to 2.6e-4 relative off (low levels) when taken from a float32 alpha_bar."""
    diff = make()
    a = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - make_betas("cosine", 1000), 0)])
    k = torch.arange(-1, 1000)
    sa, s1a = diff._coefs(k)
    assert torch.equal(sa[:, 0], a.sqrt().float()) and torch.equal(s1a[:, 0], (1 - a).sqrt().float())


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_snr_scale_multiplies_every_level_snr(scale):
    """snr_scale s: SNR'(k) = s SNR(k) at every level, clean stays clean, s = 1 is the plain schedule."""
    plain, shifted = make(), make(snr_scale=scale)
    k = torch.arange(1000)
    a = torch.cumprod(1 - make_betas("cosine", 1000), dim=0)  # float64
    torch.testing.assert_close(shifted.snr(k), (scale * a / (1 - a)).float(), rtol=1e-6, atol=0)
    assert shifted.alpha_bar(torch.tensor(-1)) == 1.0
    assert torch.equal(make(snr_scale=1.0).alpha_bar(k), plain.alpha_bar(k))


def test_snr_scale_must_be_positive():
    with pytest.raises(DifflmError, match="snr_scale must be > 0"):
        GaussianConfig(snr_scale=0.0)
