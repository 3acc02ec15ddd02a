"""The training-speed forms of difflm.models.layers against the plain forms they replace:
RoPE and RMSNorm with hand-written gradients, short attention in float32 when training on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflm.models.layers import (
    CPU_FLOAT32_ATTENTION_HEAD_DIM,
    CPU_FLOAT32_ATTENTION_KEYS,
    ROTATE_IN_PLACE_MIN,
    ExactGeluMLP,
    GeluMLP,
    RMSNorm,
    SelfAttention,
    apply_rope,
    pair_rows,
    rope_cos_sin,
    rope_phases,
    rope_tables,
    rotate_pairs,
    sdpa,
)
from difflm.models.transformer import Transformer, TransformerConfig


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The published form (HF Qwen3, LLaDA): x * cos + rotate_half(x) * sin, in float32."""
    h = x.float()
    first, second = h.chunk(2, dim=-1)
    return h * cos + torch.cat([-second, first], dim=-1) * sin


def reference_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@pytest.mark.parametrize("length", [12, 256])  # 256: past ROTATE_IN_PLACE_MIN, the in-place form
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_the_reference_form_and_its_gradient_the_transposed_rotation(dtype, length):
    cos, sin = rope_cos_sin(5, length, 16, 10000.0)
    qkv = torch.randn(2, length, 3, 4, 16).to(dtype).permute(2, 0, 3, 1, 4)  # strided, as attention slices it
    x = qkv[:2].detach().requires_grad_(True)
    assert (x.numel() >= ROTATE_IN_PLACE_MIN) == (length == 256)
    x_ref = qkv[:2].detach().float().requires_grad_(True)
    expected = reference_rope(x_ref, cos, sin)
    assert torch.equal(apply_rope(x, cos, sin), expected.to(dtype))  # bit-identical, in x's dtype
    out = apply_rope(x, cos, sin, torch.float32)  # float32 for a float32 attention: no rounding
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert x.grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), x_ref.grad.to(dtype).float(), rtol=0, atol=atol)
    with torch.no_grad():  # inference takes the plain function: the same numbers
        assert torch.equal(apply_rope(x, cos, sin), expected.detach().to(dtype))


def test_pair_rows_put_each_rotary_pair_side_by_side_and_keep_v():
    rows = pair_rows(12, 2, torch.device("cpu"))  # 2 heads of 6 dims: pairs (0, 3) (1, 4) (2, 5)
    head = [0, 3, 1, 4, 2, 5]
    expected = [*head, *(r + 6 for r in head), *(r + 12 for r in head), *(r + 18 for r in head), *range(24, 36)]
    assert rows.tolist() == expected


def test_rotating_pairs_is_the_reference_rotation_reordered():
    """q and k rotated in the projection's layout [B, Q, 2, H, D], by shared or per-row tables.
    Heads of 64 dims: on an AVX2 CPU heads of 16 dims and more matched bit for bit and an 8-dim
    head's pairs differed in the last bit (PyTorch's complex loop rounds short runs differently);
    64 leaves room for wider vector units."""
    cos, sin = rope_cos_sin(3, 10, 64, 10000.0)  # [Q, D]
    row_cos, row_sin = (t.view(2, 1, 10, 64) for t in rope_tables(torch.arange(20) % 13, 64, 10000.0))
    x = torch.randn(2, 10, 2, 4, 64)
    order = pair_rows(64, 1, torch.device("cpu"))[:64]  # one head's pair order
    heads_first = x.permute(0, 2, 3, 1, 4)  # [B, 2, H, Q, D], as the reference rotates
    for c, s, broadcast in ((cos, sin, (10, 64)), (row_cos, row_sin, (2, 1, 1, 10, 64))):
        rotated = rotate_pairs(x[..., order], rope_phases(c, s), torch.float32)
        expected = reference_rope(heads_first, c.view(broadcast), s.view(broadcast)).permute(0, 3, 1, 2, 4)
        assert torch.equal(rotated, expected[..., order])  # same roundings on the CPU


def half_split_grads(model, loss_of, monkeypatch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients through the half-split rotation (the path inference takes)."""
    model.zero_grad()
    with monkeypatch.context() as patch:
        patch.setattr(SelfAttention, "_trains_paired", lambda self: False)
        loss = loss_of(model)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("causal", [True, False])
def test_training_through_rotary_pairs_matches_the_half_split_rotation(causal, device, monkeypatch):
    """The training forward reorders q and k (one complex multiplication for the rotation); loss
    and every gradient match the half-split path's, which eval forwards take."""
    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, causal=causal, bias=True)
    ).to(device)
    ids = torch.randint(0, 40, (3, 16), device=device)
    # bidirectional: a block-diffusion layout, two copies at positions 0..7, a padding-style bias
    positions, bias = torch.arange(8, device=device).repeat(2), torch.zeros(3, 1, 1, 16, device=device)
    bias[0, ..., 12:] = float("-inf")

    def loss_of(m):
        logits = m(ids) if causal else m(ids, position_ids=positions, attention_bias=bias)
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    expected_loss, expected = half_split_grads(model, loss_of, monkeypatch)
    attention = model.blocks[0].attn
    assert attention._trains_paired()  # what follows takes the pair path
    with torch.no_grad():
        assert not attention._trains_paired()  # inference keeps the half-split form
    model.zero_grad()
    loss = loss_of(model)
    loss.backward()
    assert abs(loss.item() - expected_loss) < 1e-6
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert abs(loss_of(model).item() - expected_loss) < 1e-6


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_gradients_match_autograd_through_the_plain_form(affine):
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-6, affine=affine)
    weight_ref = torch.ones(24)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        weight_ref = norm.weight.detach().clone().requires_grad_(True)
    x = (3 * torch.randn(3, 5, 24)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = norm(x), reference_rms(x_ref, weight_ref, 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if affine:
        torch.testing.assert_close(norm.weight.grad, weight_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(norm(x), out)  # inference and training forwards agree exactly


def test_rms_norm_trains_its_gain_on_an_input_without_gradient():
    torch.manual_seed(0)
    norm, x = RMSNorm(8), torch.randn(4, 8)
    grad = torch.randn(4, 8)
    norm(x).backward(grad)
    expected = (grad * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0)
    torch.testing.assert_close(norm.weight.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_training_forward_rounds_bf16_inputs_as_inference_does(weight_dtype):
    """bf16 activations: normalised in float32, rounded to bf16, then scaled (HF Qwen3's order);
    the product's dtype follows promotion, in training as in inference."""
    torch.manual_seed(0)
    norm = RMSNorm(16).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16).bfloat16().requires_grad_(True)
    out = norm(x)
    with torch.no_grad():
        assert torch.equal(out, norm(x)) and out.dtype == torch.result_type(x, norm.weight)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == weight_dtype


def test_sdpa_trains_on_the_cpu_in_float32_and_infers_as_before():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8).bfloat16() for _ in range(3))
    hidden = (torch.rand(10, 10) > 0.7) & ~torch.eye(10, dtype=torch.bool)  # every query sees itself
    bias = torch.zeros(1, 1, 10, 10).masked_fill(hidden, float("-inf"))
    float32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = sdpa(q.requires_grad_(True), k, v, bias)
        with torch.no_grad():
            inferred = sdpa(q, k, v, bias)
    assert trained.dtype == torch.bfloat16 and torch.equal(trained, float32.bfloat16())
    assert torch.equal(inferred, F.scaled_dot_product_attention(q, k, v, attn_mask=bias.bfloat16()))
    trained.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_sdpa_keeps_wide_heads_over_many_keys_in_bf16():
    """Past both limits the bf16 backward is no slower: no casts."""
    keys, width = CPU_FLOAT32_ATTENTION_KEYS + 1, 2 * CPU_FLOAT32_ATTENTION_HEAD_DIM
    q, k, v = (torch.randn(1, 1, keys, width).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = sdpa(q.requires_grad_(True), k, v, causal=True)
    assert torch.equal(trained, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_a_training_step_under_bf16_autocast_matches_float32_attention():
    """The whole transformer: gradients under autocast stay finite and close to float32's."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))
    ids = torch.randint(0, 40, (3, 16))
    losses = []
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(ids).flatten(0, 1).float(), ids.flatten())
        loss.backward()
        losses.append((loss.item(), model.blocks[0].attn.qkv.weight.grad.clone()))
    (fp32_loss, fp32_grad), (bf16_loss, bf16_grad) = losses
    assert abs(fp32_loss - bf16_loss) < 0.02
    assert torch.isfinite(bf16_grad).all()
    assert F.cosine_similarity(fp32_grad.flatten(), bf16_grad.flatten(), dim=0) > 0.99


def test_the_default_mlp_is_erf_gelu_and_a_recorded_gelu_stays_tanh():
    shape = dict(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)
    assert type(Transformer(TransformerConfig(**shape)).blocks[0].mlp) is ExactGeluMLP
    tanh_model = Transformer(TransformerConfig(**shape, mlp="gelu"))  # as every checkpoint before it records
    mlp = tanh_model.blocks[0].mlp
    assert type(mlp) is GeluMLP
    x = torch.randn(2, 4, 8)
    expected = mlp.out_proj(F.gelu(mlp.fc(x), approximate="tanh"))
    assert torch.equal(mlp(x), expected)


def test_the_cpu_optimizer_is_fused_and_steps_as_the_loop_does():
    from difflm.config import TrainConfig
    from difflm.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16))
    twin = Transformer(TransformerConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16))
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(cfg.beta1, cfg.beta2), foreach=False)
    ids = torch.randint(0, 12, (2, 8))
    for _ in range(3):
        for net, opt in ((model, fused), (twin, loop)):
            F.cross_entropy(net(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
