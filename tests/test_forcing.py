"""Diffusion Forcing sampling: scheduling matrices by hand, the sliding window, context, guidance, trace."""

import pytest
import torch

from difflm.diffusion.gaussian import GaussianConfig, GaussianDiffusion
from difflm.errors import DifflmError
from difflm.models.dfgpt import DFGPT, DFGPTConfig
from difflm.sampling.forcing import (
    NOT_YET,
    SCHEDULES,
    _denoise_step,
    _guided_prediction,
    autoregressive,
    full_sequence,
    pyramid,
    sample_forcing,
    scheduling_matrix,
    trapezoid,
    trapezoid_reference,
)
from difflm.sampling.trace import Trace

V, D, BLOCK = 64, 32, 8

# ----------------------------------------------------------------------------- matrices by hand

HAND = [
    # pyramid(3, S=2, u=1): M[m, t] = clip(2 + t - m, 0, 2), rows 2 + 2 + 1
    (pyramid(3, 2, 1.0), [[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 1], [0, 0, 0]]),
    # pyramid(3, S=3, u=0.5): lags int(0), int(0.5), int(1.0) = 0, 0, 1
    (pyramid(3, 3, 0.5), [[3, 3, 3], [2, 2, 3], [1, 1, 2], [0, 0, 1], [0, 0, 0]]),
    (full_sequence(2, 3), [[3, 3], [2, 2], [1, 1], [0, 0]]),
    # autoregressive(2, S=2): token 1 starts once token 0 is clean
    (autoregressive(2, 2), [[2, 2], [1, 2], [0, 2], [0, 1], [0, 0]]),
    # trapezoid(5, S=2, u=1): lags min(t, 4 - t) = 0, 1, 2, 1, 0
    (
        trapezoid(5, 2, 1.0),
        [[2, 2, 2, 2, 2], [1, 2, 2, 2, 1], [0, 1, 2, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]],
    ),
    # trapezoid(4, S=2, u=1): lags 0, 1, 1, 0
    (trapezoid(4, 2, 1.0), [[2, 2, 2, 2], [1, 2, 2, 1], [0, 1, 1, 0], [0, 0, 0, 0]]),
]


@pytest.mark.parametrize("matrix, expected", HAND)
def test_matrices_by_hand(matrix, expected):
    assert matrix.dtype == torch.long
    assert matrix.tolist() == expected


def reference_trapezoid_loop(horizon: int, S: int, u: float) -> list[list[int]]:
    """The reference's loop, re-derived: rows S + int(ceil(h/2) * u); columns t and -t get lag int(t u)."""
    height = S + int((horizon + 1) // 2 * u)
    M = [[0] * horizon for _ in range(height)]
    for m in range(height):
        for t in range((horizon + 1) // 2):
            M[m][t] = M[m][-t] = min(max(S + int(t * u) - m, 0), S)
    return M


def test_trapezoid_reference_by_hand():
    """Lags [0, 1, 2, 2, 1] for h = 5; for h = 4 column 2 is never scheduled (index 0 throughout)."""
    assert trapezoid_reference(5, 2, 1.0).tolist() == [
        [2, 2, 2, 2, 2],
        [1, 2, 2, 2, 2],
        [0, 1, 2, 2, 1],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]
    assert trapezoid_reference(4, 2, 1.0).tolist() == [[2, 2, 0, 2], [1, 2, 0, 2], [0, 1, 0, 1], [0, 0, 0, 0]]
    assert scheduling_matrix("trapezoid_reference", 4, 2).tolist() == trapezoid_reference(4, 2).tolist()


@pytest.mark.parametrize(
    "horizon, S, u", [(1, 3, 1.0), (2, 3, 1.0), (5, 4, 0.5), (6, 5, 1.0), (7, 4, 2.5), (8, 2, 0.3)]
)
def test_trapezoid_reference_equals_the_reference_loop(horizon, S, u):
    assert trapezoid_reference(horizon, S, u).tolist() == reference_trapezoid_loop(horizon, S, u)


def test_default_trapezoid_is_symmetric_and_differs_from_the_reference():
    for h in (4, 5, 8):
        m = trapezoid(h, 3)
        assert torch.equal(m, m.flip(1)) and (m[0] == 3).all() and (m[-1] == 0).all()
    assert trapezoid(5, 2).tolist() != trapezoid_reference(5, 2).tolist()


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "trapezoid_reference"])
@pytest.mark.parametrize("horizon, S, scale", [(1, 1, 1.0), (4, 3, 1.0), (6, 5, 0.5), (7, 4, 2.5)])
def test_matrix_invariants(name, horizon, S, scale):
    m = scheduling_matrix(name, horizon, S, scale)
    assert m.shape[1] == horizon
    assert (m[0] == S).all() and (m[-1] == 0).all()
    assert (m >= 0).all() and (m <= S).all()
    assert (m[1:] <= m[:-1]).all()  # never noisier than the row before


def test_bad_schedule_inputs():
    with pytest.raises(DifflmError, match="unknown scheduling matrix 'zigzag'"):
        scheduling_matrix("zigzag", 4, 3)
    with pytest.raises(DifflmError, match="horizon must be >= 1"):
        pyramid(0, 3)
    with pytest.raises(DifflmError, match="uncertainty_scale"):
        trapezoid(3, 3, -1.0)


# ----------------------------------------------------------------------------- sampler


def tiny_model(**gaussian) -> DFGPT:
    torch.manual_seed(0)
    g = GaussianConfig(**{"timesteps": 20, "sampling_timesteps": 4, "stabilization_level": 2, **gaussian})
    cfg = DFGPTConfig(
        vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4, n_embd=D, use_diffusion_forcing=True, gaussian=g
    )
    return DFGPT(cfg).eval()


def run(model, prompt, **kw):
    args = dict(max_new_tokens=10, horizon=4, schedule="pyramid", generator=torch.Generator().manual_seed(5))
    return sample_forcing(model, model.diffusion, prompt, **{**args, **kw})


def test_sliding_window_never_exceeds_block_size():
    model = tiny_model()
    lengths = []
    model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(0))
    out, rec = run(model, prompt)
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt) and rec is None
    assert ((out >= 0) & (out < V)).all()
    rows = pyramid(4, 4).shape[0] - 1  # model calls per full chunk; the last chunk has horizon 2
    # chunks: cur=3 h=4 -> window 7; cur=7 h=4 -> start 3, window 8; cur=11 h=2 -> start 5, window 8
    assert lengths == [7] * rows + [8] * rows + [8] * (pyramid(2, 4).shape[0] - 1)
    assert max(lengths) <= BLOCK


def test_sampler_is_deterministic_and_bad_inputs():
    model = tiny_model(ddim_eta=0.5)
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(model, prompt)[0], run(model, prompt)[0])
    with pytest.raises(DifflmError, match="horizon must be in"):
        run(model, prompt, horizon=0)
    with pytest.raises(DifflmError, match="horizon must be in"):
        run(model, prompt, horizon=BLOCK + 1)
    with pytest.raises(DifflmError, match="unknown scheduling matrix"):
        run(model, prompt, schedule="zigzag")


class Recorder(torch.nn.Module):
    """Mock denoiser: records its inputs, predicts x0 = 0 (pred_x0)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, k):
        self.calls.append((x.clone(), k.clone()))
        return torch.zeros_like(x)


def test_context_is_stabilised_and_unchanged_frames_untouched():
    """Context is fed at level stabilization_level - 1, as the reference's sample_step does."""
    diff = GaussianDiffusion(GaussianConfig(timesteps=20, sampling_timesteps=4, stabilization_level=3))
    x = torch.randn(1, 4, D)
    k_from = torch.tensor([[-1, -1, 9, 19]])  # two context tokens, one denoising, one waiting at full noise
    k_to = torch.tensor([[-1, -1, 4, 19]])
    model = Recorder()
    out, _ = _denoise_step(model, diff, x, k_from, k_to, torch.Generator(), None, 1.0)
    x_in, k_in = model.calls[0]
    assert k_in.tolist() == [[2, 2, 9, 19]]
    scale = diff.alpha_bar(torch.tensor(2)).sqrt()
    torch.testing.assert_close(x_in[:, :2], scale * x[:, :2])
    assert torch.equal(x_in[:, 2:], x[:, 2:])
    assert torch.equal(out[:, [0, 1, 3]], x[:, [0, 1, 3]])  # levels unchanged -> untouched
    # x0 = 0, eta = 0: the moving token becomes sqrt(1 - a') * eps with eps = x_t / sqrt(1 - a)
    a, a_next = diff.alpha_bar(torch.tensor(9)), diff.alpha_bar(torch.tensor(4))
    torch.testing.assert_close(out[:, 2], ((1 - a_next) / (1 - a)).sqrt() * x[:, 2])


def test_guidance_formula_with_identity_model():
    """pred_x0 model returning its input: x0 = x_t, so d(sum(w * x0))/dx_t = w exactly.

    The gradient is scaled by sqrt(1 - alpha_bar) at the level each token steps TO, as in the
    reference's ddim_sample_step (0 for a token stepping to clean).
    """
    diff = GaussianDiffusion(GaussianConfig(timesteps=20, sampling_timesteps=4, stabilization_level=3))
    x = torch.randn(1, 3, D)
    k, k_next = torch.tensor([[2, 9, 15]]), torch.tensor([[-1, 4, 9]])
    w = torch.randn(1, 3, D)
    x0, eps = _guided_prediction(lambda xt, _k: xt, diff, x, k, lambda x0: (w * x0).sum(), 0.7, k_next)
    eps_plain = diff.eps_from_x0(x, k, x)
    expected = eps_plain - 0.7 * (1 - diff.alpha_bar(k_next))[..., None].sqrt() * w
    torch.testing.assert_close(eps[:, 0], eps_plain[:, 0])  # stepping to clean: unguided
    torch.testing.assert_close(eps, expected)
    torch.testing.assert_close(x0, diff.x0_from_eps(x, k, expected))


def test_guided_step_by_hand():
    """One guided DDIM step (eta = 0) of a token 9 -> 4: the gradient enters scaled by sqrt(1 - a_4)."""
    diff = GaussianDiffusion(GaussianConfig(timesteps=20, sampling_timesteps=4, stabilization_level=3))
    x, w = torch.randn(1, 1, D), torch.randn(1, 1, D)
    k, k_next = torch.tensor([[9]]), torch.tensor([[4]])
    out, _ = _denoise_step(
        lambda xt, _k: xt, diff, x, k, k_next, torch.Generator(), lambda x0: (w * x0).sum(), 2.0
    )
    a, a_next = diff.alpha_bar(k).item(), diff.alpha_bar(k_next).item()
    eps = (x - a**0.5 * x) / (1 - a) ** 0.5 - 2.0 * (1 - a_next) ** 0.5 * w  # x0_hat = x_t
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    torch.testing.assert_close(out, a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps)


def test_guidance_in_sampler():
    model = tiny_model()
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(0))
    plain = run(model, prompt, max_new_tokens=4)[0]
    zero = run(model, prompt, max_new_tokens=4, guidance_fn=lambda x0: x0.sum(), guidance_scale=0.0)[0]
    assert torch.equal(plain, zero)
    target = model.embed_clean(torch.full((1, 6), 7))[0, 0]
    steer = run(
        model, prompt, max_new_tokens=4, guidance_fn=lambda x0: (x0 @ target).sum(), guidance_scale=50.0
    )[0]
    assert not torch.equal(plain, steer)


def test_trace_records_every_step():
    model = tiny_model()
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(0))
    out, rec = run(model, prompt, max_new_tokens=6, horizon=4, schedule="full_sequence", trace=True)
    assert isinstance(rec, Trace)
    assert len(rec.steps) == 2 * 4  # two chunks (4 + 2 tokens) of S = 4 steps each
    assert rec.initial[0, 2:].tolist() == [NOT_YET] * 6 and rec.fill[0].tolist() == [False] * 2 + [True] * 6
    assert rec.steps[0].tokens[0, 6:].tolist() == [NOT_YET] * 2  # second chunk not started yet
    assert [s.block for s in rec.steps] == [0] * 4 + [1] * 4
    assert torch.equal(rec.steps[-1].tokens, out)


def test_sampler_runs_the_reference_trapezoid():
    """Even horizon: column h/2 is never denoised, so the model is called height - 1 times per chunk."""
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[1].clone()))
    prompt = torch.randint(0, V, (1, 2), generator=torch.Generator().manual_seed(0))
    out, _ = run(model, prompt, max_new_tokens=4, schedule="trapezoid_reference")
    assert out.shape == (1, 6) and ((out >= 0) & (out < V)).all()
    assert len(calls) == trapezoid_reference(4, 4).shape[0] - 1
    assert all((k[0, 2 + 2] == model.diffusion.context_level).item() for k in calls)  # fed as context
