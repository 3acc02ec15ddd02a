"""DFGPT: the plain-GPT path against a hand-written reference, and the Diffusion Forcing path."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from difflm.diffusion.gaussian import GaussianConfig
from difflm.errors import DifflmError
from difflm.models.dfgpt import DFGPT, DFGPTConfig
from difflm.train.objectives import AutoregressiveObjective, DiffusionForcingObjective, forcing_loss

V, L, D = 64, 16, 32


def config(**kw) -> DFGPTConfig:
    base = dict(vocab_size=V, block_size=L, n_layer=2, n_head=4, n_embd=D, bias=True)
    gaussian = GaussianConfig(timesteps=100, sampling_timesteps=10, stabilization_level=2)
    return DFGPTConfig(**{**base, "gaussian": gaussian, **kw})


def tokens(batch=2, length=L, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def df_loss(model: DFGPT, idx: torch.Tensor, g: torch.Generator, levels: torch.Tensor | None = None):
    """The training loss on idx with levels (default: drawn) and noise drawn from g, as the task does."""
    task = DiffusionForcingObjective(model.config.gaussian, model.config.n_embd)
    if levels is None:
        batch = task.prepare({"input_ids": idx}, g)
        levels, noise = batch["levels"], batch["noise"]
    else:
        noise = task.diffusion.randn((*idx.shape, model.config.n_embd), g, idx.device)
    return forcing_loss(model, idx, levels, noise)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """RoPE by complex numbers: the pair (x_i, x_{i+d/2}) at position p turns by p / 10000^(2i/d)."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())  # [B, H, T, d/2]
    angle = torch.arange(x.shape[-2]).double()[:, None] / 10000 ** (torch.arange(0, d, 2).double() / d)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def reference_logits(model: DFGPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 forward written out from the parameters: explicit masked softmax attention, no SDPA."""
    B, T = idx.shape
    H, rope = model.config.n_head, model.config.positions == "rope"
    trunk = model.trunk
    x = trunk.tok_emb.weight[idx] + (0 if rope else trunk.pos_emb.weight[:T])  # [B, T, D]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for blk in trunk.blocks:
        h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias)
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # [B, T, 3D]
        q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in qkv.split(D, dim=-1))
        if rope:
            q, k = rotate(q), rotate(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)  # [B, H, T, T]
        att = att.masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + y @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias)
        h = F.gelu(h @ blk.mlp.fc.weight.T + blk.mlp.fc.bias, approximate="tanh")
        x = x + h @ blk.mlp.out_proj.weight.T + blk.mlp.out_proj.bias
    x = F.layer_norm(x, (D,), trunk.norm_f.weight, trunk.norm_f.bias)
    return x @ trunk.tok_emb.weight.T  # tied head


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_flag_off_matches_plain_gpt_reference(positions):
    torch.manual_seed(0)
    model = DFGPT(config(positions=positions)).eval()
    ids = tokens(length=L + 1)  # the next-token task reads L inputs, L targets
    with torch.no_grad():
        ref = reference_logits(model, ids[:, :-1])
        torch.testing.assert_close(model(ids[:, :-1]), ref, atol=1e-5, rtol=1e-5)
        ref_loss = -ref.log_softmax(-1).gather(-1, ids[:, 1:, None]).mean()
        loss, _ = AutoregressiveObjective().loss(model, {"input_ids": ids})
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert model.trunk.lm_head.weight is model.trunk.tok_emb.weight
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("fuse", "head")) for n in names)  # a plain GPT has no diffusion parts


def test_modes_reject_the_other_call():
    plain, df = DFGPT(config()), DFGPT(config(use_diffusion_forcing=True))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DifflmError, match="use_diffusion_forcing=true"):
        df_loss(plain, tokens(), g)
    with pytest.raises(DifflmError, match="use_diffusion_forcing is False"):
        plain(tokens(), torch.zeros(2, L, dtype=torch.long))
    with pytest.raises(DifflmError, match="noise levels"):
        df(torch.zeros(1, 4, D))
    with pytest.raises(DifflmError, match="block_size"):
        df(torch.zeros(1, L + 1, D), torch.zeros(1, L + 1, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message", [({"fusion": "film"}, "unknown fusion"), ({"n_head": 5}, "divisible")]
)
def test_bad_config(kwargs, message):
    with pytest.raises(DifflmError, match=message):
        config(**kwargs)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_denoiser_shapes_and_causality(fusion):
    torch.manual_seed(0)
    model = DFGPT(config(use_diffusion_forcing=True, fusion=fusion)).eval()
    x = torch.randn(2, 8, D)
    k = torch.randint(0, 100, (2, 8))
    out = model(x, k)
    assert out.shape == (2, 8, D)
    x2, k2 = x.clone(), k.clone()
    x2[:, 5:] += 1.0
    k2[:, 5:] = 0  # changing later tokens (or their levels) never changes earlier outputs
    out2 = model(x2, k2)
    torch.testing.assert_close(out2[:, :5], out[:, :5])
    assert not torch.allclose(out2[:, 5:], out[:, 5:])
    k3 = k.clone()
    k3[:, 2] = 99  # the level is an input: it changes the token's own output
    assert not torch.allclose(model(x, k3)[:, 2], out[:, 2])


def test_clean_embeddings_and_rounding():
    torch.manual_seed(0)
    model = DFGPT(config(use_diffusion_forcing=True))
    idx = tokens()
    x0 = model.embed_clean(idx)
    torch.testing.assert_close(x0.norm(dim=-1), torch.full((2, L), math.sqrt(D)))
    assert torch.equal(model.decode_nearest(x0), idx)
    with torch.no_grad():
        model.trunk.tok_emb.weight.mul_(1e-3)  # shrinking the embeddings cannot shrink the clean targets (no collapse)
    torch.testing.assert_close(model.embed_clean(idx), x0)
    x = torch.randn(2, L, D) * 3
    assert torch.equal(model.decode_nearest(x), model.round_logits(x).argmax(-1))


def test_diffusion_loss_parts_and_determinism():
    torch.manual_seed(0)
    model = DFGPT(config(use_diffusion_forcing=True))
    idx = tokens()
    loss, metrics = df_loss(model, idx, torch.Generator().manual_seed(3))
    again, _ = df_loss(model, idx, torch.Generator().manual_seed(3))
    assert set(metrics) == {"diffusion_loss", "rounding_nll"}
    torch.testing.assert_close(loss, again)
    w = model.config.gaussian.rounding_weight
    torch.testing.assert_close(loss.detach(), metrics["diffusion_loss"] + w * metrics["rounding_nll"])
    loss.backward()
    assert model.trunk.tok_emb.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_target_grad_off_detaches_only_the_diffusion_target():
    """Same loss either way; without target_grad the embeddings get the gradient of a detached target."""
    idx, grads, losses = tokens(), {}, {}
    for flag in (True, False):
        torch.manual_seed(0)
        model = DFGPT(config(use_diffusion_forcing=True, target_grad=flag))
        loss, _ = df_loss(model, idx, torch.Generator().manual_seed(3))
        loss.backward()
        losses[flag], grads[flag] = loss.item(), model.trunk.tok_emb.weight.grad.clone()
    assert losses[True] == losses[False]
    assert not torch.equal(grads[True], grads[False])


def test_diffusion_forcing_overfits_one_batch():
    torch.manual_seed(0)
    model = DFGPT(config(use_diffusion_forcing=True))
    idx = tokens(batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, _ = df_loss(model, idx, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]

    def rounding_nll(level: int) -> float:
        levels = torch.full_like(idx, level)  # fixed levels instead of random ones
        return df_loss(model, idx, torch.Generator().manual_seed(0), levels)[1]["rounding_nll"].item()

    # trained: nearly clean input rounds back to its tokens far better than pure noise does
    assert rounding_nll(0) < 0.5 * rounding_nll(99)


def cycle_rows(n: int, g: torch.Generator, vocab: int = 16, length: int = 32) -> torch.Tensor:
    """Rows that repeat a random 4-token cycle: token i is token i - 4."""
    return torch.stack([torch.randperm(vocab, generator=g)[:4].repeat(length // 4) for _ in range(n)])


def successor_rows(n: int, g: torch.Generator, vocab: int = 16, length: int = 32) -> torch.Tensor:
    """Rows that count up mod vocab from a random start: token i is a function of token i - 1."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + torch.arange(length)) % vocab


def _task_nll(rows, input_scale: float = 0.02, positions: str = "learned", steps: int = 100) -> float:
    """One-step next-token NLL after training a Diffusion Forcing model on `rows`."""
    from difflm.evaluate.forcing import next_token_nll

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = DFGPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=4, n_embd=64, positions=positions)
    model = DFGPT(dataclasses.replace(cfg, use_diffusion_forcing=True, input_scale=input_scale))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        loss, _ = df_loss(model, rows(32, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return next_token_nll(model, list(rows(64, torch.Generator().manual_seed(1))), batch_size=64)


def test_scaled_input_lets_diffusion_forcing_learn_from_context():
    """Unit-RMS noisy inputs drown the learned positions: the model cannot find the token 4 back.
    At the GPT's embedding scale it can (uniform guessing is log 16 = 2.77 nats)."""
    scaled, unscaled = _task_nll(cycle_rows, 0.02), _task_nll(cycle_rows, 1.0)
    assert scaled < 0.3 < 2.3 < unscaled


def test_rotary_positions_let_diffusion_forcing_find_the_previous_token():
    """A noisy token must fetch its predecessor by attention alone; rotary positions make that
    relative lookup easy, learned absolute ones do not (the Tiny Shakespeare failure in small)."""
    rope = _task_nll(successor_rows, positions="rope")
    learned = _task_nll(successor_rows, positions="learned")
    assert rope < 0.5 * learned


def test_saved_configs_from_before_rotary_positions_load_with_learned_positions():
    from difflm.config import RunConfig, config_from_dict, saved_config_from_dict, to_dict

    data = to_dict(RunConfig(task="teacher_forcing", model=config()))
    del data["model"]["positions"]  # a difflm.json written before the option existed
    assert saved_config_from_dict(data).model.positions == "learned"
    assert config_from_dict(data).model.positions == "rope"  # a new config takes the new default


def test_checkpoints_written_before_the_core_trunk_still_load(tmp_path):
    """Weights saved under DFGPT's own module names (wte, blocks.i.attn.c_attn, ...) load by
    `legacy_keys`, and the loaded model computes what the saved one did."""
    import json

    from safetensors.torch import load_file, save_file

    from difflm.train import checkpoint as ckpt

    old_names = {  # new name -> the name the pre-trunk DFGPT stored it under (written out by hand)
        "trunk.tok_emb.weight": "wte.weight",
        "trunk.norm_f.weight": "ln_f.weight",
        "trunk.norm_f.bias": "ln_f.bias",
    }
    for i in range(2):
        for new, old in (
            ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"), ("attn.out_proj", "attn.c_proj"),
            ("mlp.fc", "mlp.fc"), ("mlp.out_proj", "mlp.out_proj"),
        ):
            for kind in ("weight", "bias"):
                old_names[f"trunk.blocks.{i}.{new}.{kind}"] = f"blocks.{i}.{old}.{kind}"
    for name in ("fuse.0", "fuse.2", "head"):
        for kind in ("weight", "bias"):
            old_names[f"{name}.{kind}"] = f"{name}.{kind}"
    torch.manual_seed(0)
    model = DFGPT(config(use_diffusion_forcing=True)).eval()
    step = ckpt.save_checkpoint(tmp_path, 1, model=model, run_config={}, trainer_state={})
    stored = load_file(str(step / ckpt.MODEL_FILE))
    buffers = {k: v for k, v in stored.items() if k not in old_names}
    assert all(k.startswith("diffusion.") for k in buffers)  # the schedule's buffers kept their names
    save_file({**{old_names[k]: v for k, v in stored.items() if k in old_names}, **buffers}, str(step / ckpt.MODEL_FILE))
    manifest = json.loads((step / ckpt.MANIFEST_FILE).read_text())
    manifest["tied"] = {}  # the old Diffusion Forcing model had no LM head to tie
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))

    torch.manual_seed(1)
    loaded = DFGPT(config(use_diffusion_forcing=True)).eval()
    ckpt.load_weights(loaded, step)
    x, k = torch.randn(2, L, D), torch.randint(0, 100, (2, L))
    torch.testing.assert_close(loaded(x, k), model(x, k), atol=0, rtol=0)
    assert loaded.trunk.lm_head.weight is loaded.trunk.tok_emb.weight
