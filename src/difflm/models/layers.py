"""Transformer building blocks shared by difflm's own models.

Everything here is a plain `nn.Module` or a pure function: norms, rotary position embeddings,
attention taking an additive bias (the project-wide convention, see docs/architecture.md),
MLPs, AdaLN-Zero modulation, the timestep embedding, the attention-bias helpers and the KV cache.
Nothing here knows about diffusion, losses or sampling.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.errors import DifflmError

# ---------------------------------------------------------------------------------------------
# attention bias helpers: 0 where a query may see a key, -inf where it may not


def padding_bias(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, L] mask (1/True = real token, 0/False = padding) -> additive bias [B, 1, 1, L]."""
    if attention_mask.dim() != 2:
        raise DifflmError(f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~keep, float("-inf"))


def causal_bias(
    length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive bias [1, 1, L, L] letting query i see keys j <= i."""
    return causal_rows_bias(0, length, length, device, dtype)


def causal_rows_bias(
    start: int, rows: int, keys: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Rows start..start+rows of the causal bias over `keys` key slots [1, 1, rows, keys]: the query
    at absolute position start + i sees keys j <= start + i. Decoding with a KV cache needs only
    these rows; building the whole keys x keys matrix each step grows with the context squared."""
    query = torch.arange(start, start + rows, device=device)[:, None]  # [rows, 1]
    future = torch.arange(keys, device=device)[None, :] > query  # [rows, keys]
    return torch.zeros(rows, keys, dtype=dtype, device=device).masked_fill(future, float("-inf"))[None, None]


def combine_bias(*biases: Tensor | None) -> Tensor | None:
    """Sum the given additive biases (None entries skipped); None when all are None.

    Summing is the right combination: a key is visible only if every bias allows it (-inf wins).
    """
    present = [b for b in biases if b is not None]
    if not present:
        return None
    out = present[0]
    for b in present[1:]:
        out = out + b
    return out


# ---------------------------------------------------------------------------------------------
# norms, rotary embeddings, timestep embedding


class RMSNorm(nn.Module):
    """Root-mean-square norm; `affine=False` when AdaLN supplies the scale instead."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self._eps_tensor: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        eps = self._eps(x)
        weight_trains = self.weight is not None and self.weight.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or weight_trains):
            return _RMSNorm.apply(x, self.weight, eps)
        return apply_gain(rms_normalize(x, eps), self.weight)

    def _eps(self, like: Tensor) -> Tensor:
        """eps as a one-element tensor on like's device (cached: made once, not at every call)."""
        if self._eps_tensor is None or self._eps_tensor.device != like.device:
            self._eps_tensor = torch.tensor([self.eps], dtype=torch.float32, device=like.device)
        return self._eps_tensor


def rms_normalize(x: Tensor, eps: Tensor) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in float32, returned in x's dtype."""
    h, r = _rms_inverse(x, eps)
    return (h * r).to(x.dtype)


def _rms_inverse(x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """x in float32 and 1 / sqrt(mean(x^2) + eps) [..., 1]. float32: bf16 sums of squares lose
    too much precision. The mean square as norm^2 / C: one reduction kernel and no scalar ops
    (each eager op costs microseconds, which at batch 1 outweighs the arithmetic)."""
    h = x.float()
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h, torch.rsqrt(torch.addcmul(eps, norm, norm, value=1 / h.shape[-1]))


def apply_gain(h: Tensor, weight: Tensor | None) -> Tensor:
    """h * weight (h itself when weight is None), in place where that keeps the product's dtype."""
    if weight is None:
        return h
    return h.mul_(weight) if torch.result_type(h, weight) == h.dtype else h * weight


class _RMSNorm(torch.autograd.Function):
    """`apply_gain(rms_normalize(x), weight)` with its gradients by hand: autograd's chain of saved
    intermediates and a separate gain made a training step's norms ~3x a fused LayerNorm on the CPU,
    where every pass that writes a fresh [..., C] tensor costs about as much as the arithmetic.
    With r = 1 / sqrt(mean(x^2) + eps) and u = g * r * weight:
    d/dx = u - x * r^2 * mean(u * x), d/dweight = sum over rows of g * r * x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, eps: Tensor) -> Tensor:
        h, r = _rms_inverse(x, eps)
        ctx.save_for_backward(x, r, weight)
        return apply_gain((h * r).to(x.dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, r, weight = ctx.saved_tensors
        h, u = x.float(), grad.float() * r
        weight_grad = None
        if ctx.needs_input_grad[1]:
            weight_grad = torch.linalg.vecdot(u.flatten(0, -2), h.flatten(0, -2), dim=0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, weight_grad, None
        if weight is not None:
            u.mul_(weight)
        coef = torch.linalg.vecdot(u, h, dim=-1).unsqueeze(-1).mul_(r.square()).div_(h.shape[-1])  # [..., 1]
        return u.addcmul_(h, coef, value=-1).to(x.dtype), weight_grad, None


NORMS = ("rms", "layer")


def make_norm(kind: str, dim: int, eps: float, affine: bool = True, bias: bool = False) -> nn.Module:
    """RMSNorm (`rms`, LLaMA) or LayerNorm (`layer`, GPT-2 / nanoGPT; `bias` as its linears)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)
    return RMSNorm(dim, eps, affine)


@functools.lru_cache(maxsize=256)
def rope_cos_sin(
    start: int, length: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin tables [length, head_dim] (float32) for absolute positions start..start+length.

    Not buffers, so `model.to(bfloat16)` cannot degrade them and any position offset works;
    remembered per (start, length, ...) since a sampler asks for the same few at every step.
    Callers must not modify them in place. Made outside inference mode, so a table first asked
    for while sampling can still be saved for backward in training.
    """
    with torch.inference_mode(False):
        return rope_tables(torch.arange(start, start + length, device=device), head_dim, theta)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables [Q, head_dim] (float32) for any absolute positions [Q] (e.g. the two copies
    of a block-diffusion input, both at 0..L-1)."""
    device = positions.device
    # 1 / theta^(2i/D), written as the reference implementations (HF Qwen3, LLaDA) write it, so
    # the float32 tables are bit-identical to theirs
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = positions.to(torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [Q, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [Q, D]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rotate x [..., Q, D] (e.g. [B, H, Q, D]) by the tables [Q, D] (half-split pairing), in
    float32; the result in `dtype` (default x's)."""
    dtype = x.dtype if dtype is None else dtype
    if x.requires_grad and torch.is_grad_enabled():
        return _Rope.apply(x, cos, sin, dtype)
    return _rotate(x, cos, sin, 1, dtype)


ROTATE_IN_PLACE_MIN = 65536  # elements; below it the concatenating form's fewer op calls are faster


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: int, dtype: torch.dtype) -> Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (sign=1), or its transpose
    [x2, -x1] (sign=-1), in float32 (the tables' dtype: a bf16 x is promoted exactly, without a
    float32 copy), returned in `dtype`. Products and sums are rounded as in the reference form (HF
    Qwen3, LLaDA), so sign=1 is bit-identical to it; the halves are updated in place rather than
    concatenating a rotated copy (two fewer passes over x) once x is large enough for passes to
    matter more than eager op calls (a sampling step at batch 1 is the other way round)."""
    if x.numel() < ROTATE_IN_PLACE_MIN:
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first] if sign == 1 else [second, -first], dim=-1)
        return (x * cos + rotated * sin).to(dtype)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half], alpha=sign)
    out[..., half:].add_(x[..., :half] * sin[..., half:], alpha=sign)
    return out.to(dtype)


class _Rope(torch.autograd.Function):
    """`_rotate` with its gradient, the transposed rotation of the incoming gradient: autograd
    through the reference form saves and revisits every intermediate (the negated half, the
    concatenation, both products), a large share of a training step on the CPU. The transpose
    holds for rotary tables, whose two halves are equal (dims i and i + D/2 share a frequency)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = x.dtype
        return _rotate(x, cos, sin, 1, dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1, ctx.input_dtype), None, None, None


# Training a fused qkv projection, the rotation costs one complex multiplication instead of
# `_Rope`'s passes over q and k: the projection's q and k rows are taken in an order that puts each
# head's dims i and i + D/2 (a rotary pair) side by side, so q and k read as complex numbers. The
# scores q.k are unchanged by that reordering (q and k share it); v's rows keep their order. q and
# k are rotated in the projection's own layout [B, Q, 2, H, D], before the heads are permuted: the
# product reads the projection's output in order, and in the backward the gradients of q, k and v
# meet in that layout (no strided gather). An AR training step on the CPU: 0.96-0.98x as long at
# 4x128, ~0.95x at 6x384 (docs/results/train_step).


@functools.lru_cache(maxsize=64)
def pair_rows(n_embd: int, n_head: int, device: torch.device) -> Tensor:
    """The row order [3C] of a fused q, k, v projection that puts each q and k head's rotary
    pairs (dims i, i + D/2) side by side: i, i + D/2, i + 1, i + 1 + D/2, ... per head."""
    half = n_embd // n_head // 2
    head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()  # [D]
    qk = (torch.arange(2 * n_head).unsqueeze(1) * 2 * half + head).flatten()  # [2C]
    return torch.cat([qk, torch.arange(2 * n_embd, 3 * n_embd)]).to(device)


def rope_phases(cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary tables [Q, D] (per-row tables: [B, 1, Q, D]) as unit complex numbers, cos + i sin
    per pair, shaped for q and k in the projection's layout [B, Q, 2, H, D/2]: [Q, 1, 1, D/2]
    ([B, Q, 1, 1, D/2])."""
    half = cos.shape[-1] // 2
    phases = torch.complex(cos[..., :half], sin[..., :half])
    return (phases.squeeze(1) if phases.dim() == 4 else phases)[..., None, None, :]


def rotate_pairs(x: Tensor, phases: Tensor, dtype: torch.dtype) -> Tensor:
    """Rotate x [..., D] laid out in side-by-side pairs (`pair_rows`) by phases that broadcast to
    [..., D/2], in float32; the result in `dtype`. On the CPU the product of (a + ib)(c + id) is
    rounded as the reference form rounds a*c - b*d and b*c + a*d (checked on an AVX2 CPU for heads of
    16 dims and more; an 8-dim head's pairs differed in the last bit)."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * phases).flatten(-2).to(dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal features [B, dim] of continuous times t [B] in [0, 1].

    t is multiplied by `scale` first: with t in [0, 1] most frequencies would otherwise barely
    move and the embedding could hardly tell nearby times apart.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * scale * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Full-length key/value buffers, one pair per layer: k, v [B, H, max_len, D].

    One design serves autoregressive decoding and block-wise diffusion caching. A forward with
    `position_offset=s` over Q tokens writes each layer's new (rotated) k, v into slots [s, s+Q)
    and attends over slots [0, attend_len): attend_len = s+Q is the autoregressive / prefix-cache
    case, attend_len = max_len the dual-cache case where stale suffix entries are reused.
    Use it under `torch.no_grad()`: the buffers are written in place.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.n_layer, self.batch, self.n_head, self.max_len, self.head_dim = n_layer, *shape
        self.length = 0  # one past the highest slot written so far

    @classmethod
    def for_model(
        cls, model: nn.Module, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache shaped for `model`: its own `kv_cache(batch, max_len, dtype)` when it has one
        (Qwen3-LLaDA), else read from a TransformerConfig-like `model.config`."""
        if hasattr(model, "kv_cache"):
            return model.kv_cache(batch, max_len, dtype)
        cfg: Any = model.config
        param = next(model.parameters())
        return cls(
            n_layer=cfg.n_layer,
            batch=batch,
            n_head=cfg.n_head,
            max_len=cfg.block_size if max_len is None else max_len,
            head_dim=cfg.n_embd // cfg.n_head,
            device=param.device,
            dtype=param.dtype if dtype is None else dtype,
        )

    def check(self, batch: int, start: int, length: int, attend_len: int) -> None:
        """Raise DifflmError before any write if this request does not fit the cache."""
        if batch != self.batch:
            raise DifflmError(
                f"KV cache was built for batch {self.batch}, got batch {batch}; build a new cache"
            )
        if start < 0 or start + length > self.max_len:
            raise DifflmError(
                f"KV cache write to slots [{start}, {start + length}) exceeds max_len {self.max_len}; "
                "build the cache with a larger max_len"
            )
        if not start + length <= attend_len <= self.max_len:
            raise DifflmError(
                f"attend_len {attend_len} must lie in [{start + length}, {self.max_len}] "
                "(the end of this input up to the cache length)"
            )

    def update(self, layer: int, start: int | Tensor, k: Tensor, v: Tensor, attend_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, Q, D] at slots [start, start+Q) (start [B]: each row at its own
        slots); return slots [0, attend_len)."""
        if isinstance(start, Tensor):
            rows = torch.arange(len(start), device=start.device)[:, None]  # [B, 1]
            slots = start[:, None] + torch.arange(k.shape[2], device=start.device)  # [B, Q]
            self.k[layer][rows, :, slots] = k.transpose(1, 2)  # indexed as [B, Q, H, D]
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
            end = int(slots.max()) + 1
        else:
            end = start + k.shape[2]
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        self.length = max(self.length, end)
        return self.k[layer][:, :, :attend_len], self.v[layer][:, :, :attend_len]  # [B, H, K, D]


# ---------------------------------------------------------------------------------------------
# attention and MLPs


@dataclass
class AttentionContext:
    """What every layer's self-attention needs for one forward, built once by the model."""

    cos: Tensor | None  # [Q, D] (per-row offsets: [B, 1, Q, D]); None: no rotary positions
    sin: Tensor | None
    bias: Tensor | None = None  # broadcastable to [B, 1, Q, K]
    is_causal: bool = False  # SDPA's own causal path (no cache, no extra bias)
    cache: KVCache | None = None
    start: int | Tensor = 0  # the cache slot of the first query; [B]: one per row
    attend_len: int = 0

    @functools.cached_property
    def phases(self) -> Tensor:
        """cos, sin as complex numbers for `rotate_pairs` (made once per forward, on first use)."""
        return rope_phases(self.cos, self.sin)


# Training on the CPU, PyTorch's bf16 flash-attention backward is 1.2-2.7x slower than float32's
# for narrow heads or few keys, and about as fast or faster for wider heads over more keys
# (benchmarks/attention.py): `sdpa` runs attention in float32 up to either limit.
CPU_FLOAT32_ATTENTION_HEAD_DIM = 32
CPU_FLOAT32_ATTENTION_KEYS = 128


def float32_attention(q: Tensor, keys: int) -> bool:
    """Whether `sdpa` runs the attention of q [..., D] over `keys` keys in float32: a training
    forward (q part of a graph being differentiated) on the CPU with narrow heads or few keys."""
    small = q.shape[-1] <= CPU_FLOAT32_ATTENTION_HEAD_DIM or keys <= CPU_FLOAT32_ATTENTION_KEYS
    return small and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled()


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, dropout: float = 0.0, causal: bool = False
) -> Tensor:
    """F.scaled_dot_product_attention of q [B, H, Q, D] over k, v [B, H, K, D] with an additive
    bias, in v's dtype; in float32, out of autocast, where `float32_attention` says so."""
    if float32_attention(q, k.shape[-2]) and (v.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            return sdpa(q.float(), k.float(), v.float(), bias, dropout, causal).to(v.dtype)
    mask = bias.to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on q/k and an additive bias, via SDPA."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: AttentionContext, layer: int, cols: Tensor | None = None) -> Tensor:
        """x [B, Q, C] -> [B, Q, C]; with cols [Q'], only those positions ask (queries, output
        [B, Q', C]) while every position is still a key and value."""
        if cols is not None:
            return self._some_queries(x, ctx, layer, cols)
        B, Q, C = x.shape
        paired = ctx.cos is not None and self._trains_paired()
        if paired:  # q and k heads in rotary pairs side by side
            rows = pair_rows(C, self.n_head, x.device)
            bias = None if self.qkv.bias is None else self.qkv.bias[rows]
            qkv = F.linear(x, self.qkv.weight[rows], bias)
        else:
            qkv = self.qkv(x)
        # split, not indexed, and before the heads are permuted: its backward concatenates straight
        # into the projection's layout (no zero-filled parts, no copy back)
        qk, v = qkv.view(B, Q, 3, self.n_head, C // self.n_head).split([2, 1], dim=2)  # [B, Q, 2 | 1, H, D]
        v = v.squeeze(2).transpose(1, 2)  # [B, H, Q, D]
        # q and k rotated in one go, left in float32 for a float32 `sdpa`
        dtype = torch.float32 if float32_attention(qk, Q) else qk.dtype
        if paired:
            q, k = (t.transpose(1, 2) for t in rotate_pairs(qk, ctx.phases, dtype).unbind(2))
        else:
            qk = qk.permute(2, 0, 3, 1, 4)  # [2, B, H, Q, D]
            q, k = qk if ctx.cos is None else apply_rope(qk, ctx.cos, ctx.sin, dtype)
        return self._attend(q, k, v, ctx, layer, ctx.bias, ctx.is_causal)

    def _trains_paired(self) -> bool:
        """Whether this forward rotates q and k as complex pairs: a training forward of a plain
        projection. Inference keeps the half-split order, whose attention sums the scores in the
        reference order (bit-identical to HF Qwen3 / LLaDA); an adapter- or int8-wrapped projection
        has no weight to reorder."""
        return type(self.qkv) is nn.Linear and self.qkv.weight.requires_grad and torch.is_grad_enabled()

    def _some_queries(self, x: Tensor, ctx: AttentionContext, layer: int, cols: Tensor) -> Tensor:
        if ctx.is_causal:
            raise DifflmError("query columns need an explicit bias, not SDPA's causal path")
        B, Q, C = x.shape
        H, w, b = self.n_head, self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, cols], w[:C], None if b is None else b[:C]).view(B, len(cols), H, C // H).transpose(1, 2)
        k, v = F.linear(x, w[C:], None if b is None else b[C:]).view(B, Q, 2, H, C // H).permute(2, 0, 3, 1, 4)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos[..., cols, :], ctx.sin[..., cols, :]), apply_rope(k, ctx.cos, ctx.sin)
        bias = ctx.bias if ctx.bias is None or ctx.bias.shape[2] == 1 else ctx.bias[:, :, cols]
        return self._attend(q, k, v, ctx, layer, bias, False)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, layer: int, bias: Tensor | None, causal: bool
    ) -> Tensor:
        """Attention of q [B, H, Q', D] over k, v [B, H, Q, D] (through the cache when there is
        one), projected: [B, Q', C]."""
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, ctx.start, k, v, ctx.attend_len)  # [B, H, K, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = sdpa(q, k, v, bias, self.dropout if self.training else 0.0, causal)  # [B, H, Q', D]
        B, H, Qq, D = y.shape
        return self.resid_drop(self.out_proj(y.transpose(1, 2).reshape(B, Qq, H * D)))


class CrossAttention(nn.Module):
    """Attention from the sequence to a few memory tokens (no positions, no mask)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q = nn.Linear(n_embd, n_embd, bias=bias)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)  # zero-initialised by the model
        self.resid_drop = nn.Dropout(dropout)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, T, D] of memory tokens [B, T, C]."""
        B, T, C = memory.shape
        k, v = self.kv(memory).view(B, T, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, memory: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, Q, C] attends to memory [B, T, C], or to its precomputed `keys_values` kv."""
        B, Q, C = x.shape
        H = self.n_head
        q = self.q(x).view(B, Q, H, C // H).transpose(1, 2)  # [B, H, Q, D]
        k, v = self.keys_values(memory) if kv is None else kv  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.out_proj(y.transpose(1, 2).reshape(B, Q, C)))


class GeluMLP(nn.Module):
    """fc -> GELU(tanh) -> projection, as in GPT-2."""

    approximate = "tanh"

    def __init__(self, n_embd: int, hidden: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.out_proj(F.gelu(self.fc(x), approximate=self.approximate)))


class ExactGeluMLP(GeluMLP):
    """fc -> GELU(erf) -> projection, as in nanoGPT (`nn.GELU()`); on CPU half the tanh form's cost."""

    approximate = "none"


class SwiGLU(nn.Module):
    """silu(gate) * up -> projection, as in LLaMA."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_up = nn.Linear(n_embd, 2 * hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, L, hidden] each
        return self.drop(self.out_proj(F.silu(gate) * up))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "gelu_exact": ExactGeluMLP, "swiglu": SwiGLU}


def project(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(h, weight, bias). At inference on the CPU, a few rows h [N, C] against a wide
    weight [V, C] (a vocabulary projection at batch 1) go as (weight @ h^T)^T: MKL's sgemm with
    few rows is ~1.5-2x slower the usual way round (10 x 256 @ 256 x 30522: 14 vs 10 ms here)."""
    few_rows = h.dim() == 2 and len(h) <= 32 and weight.shape[0] >= 4096
    if few_rows and h.device.type == "cpu" and not torch.is_grad_enabled():
        out = (weight @ h.T).T  # [N, V], a transposed view
        return out if bias is None else out + bias
    return F.linear(h, weight, bias)


# ---------------------------------------------------------------------------------------------
# AdaLN-Zero


class AdaLNModulation(nn.Module):
    """c [B, C] -> `n_chunks` vectors [B, C] (shifts, scales, gates), zero at init.

    Zero output at init is the "Zero" of AdaLN-Zero: every gate is 0, so each block starts as
    the identity and the network's output does not depend on the conditioning until trained.
    """

    def __init__(self, n_embd: int, n_chunks: int) -> None:
        super().__init__()
        self.n_chunks = n_chunks
        self.proj = nn.Linear(n_embd, n_chunks * n_embd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def packed(self, c: Tensor) -> Tensor:
        """c [..., C] -> the n_chunks vectors side by side [..., n_chunks * C]."""
        return self.proj(F.silu(c))

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.packed(c).chunk(self.n_chunks, dim=-1)  # n_chunks x [B, C]


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor | None) -> Tensor:
    """x [B, L, C] * (1 + scale) + shift with shift/scale [B, C]; identity when not modulated."""
    if shift is None or scale is None:
        return x
    return torch.addcmul(x, x, scale.unsqueeze(1)).add_(shift.unsqueeze(1))  # x + x * scale + shift


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    """x + gate * y for x, y [B, L, C] and gate [B, C]; x + y when not modulated."""
    return x + y if gate is None else torch.addcmul(x, gate.unsqueeze(1), y)
