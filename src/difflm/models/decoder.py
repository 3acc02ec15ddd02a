"""The Qwen3 decoder, written in difflm: the blocks every published bidirectional LM here is built of.

A pre-norm decoder layer is `x + attn(norm(x))` then `x + mlp(norm(x))` with RMSNorm, grouped-query
attention (GQA: `heads` query heads share `kv_heads` key/value heads) under rotary position
embeddings, and a SwiGLU MLP `down(silu(gate(x)) * up(x))`. Qwen3 adds an RMSNorm on each query and
key head (q/k-norm) before RoPE; Qwen2 / Dream put biases on the q/k/v projections instead; LLaDA
names its tensors differently but computes the same thing. So `Attention` and `DecoderLayer` take
those two switches, keep Hugging Face's parameter names (`self_attn.q_proj`, `q_norm`,
`mlp.gate_proj`, `input_layernorm`, ...), and a checkpoint's tensors load key for key.

Attention follows the difflm conventions (docs/architecture.md), not a causal LM's: no built-in
causality, an optional additive bias broadcastable to [B, 1, Q, K] (block attention, padding, or a
causal bias to reproduce the source LM), and difflm's slot KV cache (`layers.KVCache`): a forward at
`position_offset=s` over Q tokens writes its rotated keys/values into slots [s, s+Q) and attends
over slots [0, attend_len), which is how the sampler's prefix / dual caches rewrite a block in the
middle of a sequence. `attention_context` builds that per-forward state once for all layers.

RoPE tables are computed in float32 and q/k are rotated in float32 (as LLaDA does; Hugging Face's
Qwen3 rotates in the model dtype), so in float32 the logits equal `Qwen3ForCausalLM`'s and in
bfloat16 they are, if anything, closer to the float32 ones. Only PyTorch is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.errors import DifflmError
from difflm.models.layers import (
    AttentionContext,
    KVCache,
    RMSNorm,
    apply_rope,
    combine_bias,
    padding_bias,
    rope_cos_sin,
    rope_tables,
    sdpa,
)


def additive_mask(
    attention_bias: Tensor | None,
    attention_mask: Tensor | None,
    batch: int,
    queries: int,
    keys: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """Merge a bias [B|1, 1, Q|1, K] and a padding mask [B, K] into one additive mask of `dtype`.

    The result broadcasts to [B, 1, Q, K] (padding alone stays [B, 1, 1, K]: no L x L tensor).
    -inf becomes the dtype's minimum, so a query that sees no key at all (a padded query under
    block attention) gets a uniform softmax instead of NaN. None means full attention.
    """
    if attention_bias is not None and (
        attention_bias.dim() != 4
        or attention_bias.shape[-1] != keys
        or attention_bias.shape[-2] not in (1, queries)
    ):
        raise DifflmError(
            f"attention_bias has shape {tuple(attention_bias.shape)}, expected [B, 1, {queries} or 1, {keys}]"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, keys):
        raise DifflmError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected [B, K] = [{batch}, {keys}]"
        )
    bias = combine_bias(
        None if attention_bias is None else attention_bias.to(device, torch.float32),
        None if attention_mask is None else padding_bias(attention_mask.to(device)),
    )  # [B|1, 1, Q|1, K]
    return None if bias is None else bias.clamp(min=torch.finfo(dtype).min).to(dtype)


def attention_context(
    batch: int,
    queries: int,
    head_dim: int,
    rope_theta: float,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention_bias: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_offset: int = 0,
    kv_cache: KVCache | None = None,
    attend_len: int | None = None,
    position_ids: Tensor | None = None,
) -> AttentionContext:
    """RoPE tables, mask and cache slots for one forward over Q inputs at positions offset..offset+Q.

    With `kv_cache`, attention runs over slots [0, attend_len) (default offset + Q), so the bias and
    padding mask cover attend_len keys; without it, over the Q inputs themselves. `position_ids`
    [Q] gives explicit positions instead (no cache): block diffusion's two copies of a sequence.
    """
    if position_ids is not None and (kv_cache is not None or position_offset):
        raise DifflmError("position_ids replace position_offset and take no kv_cache")
    if kv_cache is not None:
        attend_len = position_offset + queries if attend_len is None else attend_len
        kv_cache.check(batch, position_offset, queries, attend_len)
    elif attend_len is not None or position_offset:
        raise DifflmError("position_offset / attend_len need a kv_cache (see difflm.models.layers.KVCache)")
    keys = queries if kv_cache is None else attend_len
    if position_ids is None:
        cos, sin = rope_cos_sin(position_offset, queries, head_dim, rope_theta, device)  # [Q, D] each
    else:
        cos, sin = rope_tables(position_ids.to(device), head_dim, rope_theta)  # [Q, D] each
    bias = additive_mask(attention_bias, attention_mask, batch, queries, keys, dtype, device)
    return AttentionContext(cos, sin, bias, cache=kv_cache, start=position_offset, attend_len=keys)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, H_kv, K, D] -> [B, H_kv * groups, K, D]: each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    B, H, K, D = x.shape
    return x[:, :, None].expand(B, H, groups, K, D).reshape(B, H * groups, K, D)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: AttentionContext,
    layer: int,
    *,
    dropout: float = 0.0,
    eager: bool = False,
) -> Tensor:
    """Attention of q [B, H, Q, D] over k, v [B, H_kv, Q, D] (not yet rotated) -> [B, Q, H * D].

    Rotates q and k, writes k, v into the cache when there is one (and reads back its
    [0, attend_len) slots), then runs SDPA, or the explicit softmax when `eager` (float32 softmax).
    """
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, ctx.start, k, v, ctx.attend_len)  # [B, H_kv, K, D]
        k, v = k.to(q.dtype), v.to(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, H, K, D]
    if eager:
        scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5  # [B, H, Q, K]
        if ctx.bias is not None:
            scores = scores + ctx.bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        y = F.dropout(probs, p=dropout) @ v  # [B, H, Q, D]
    else:
        y = sdpa(q, k, v, ctx.bias, dropout)
    return y.transpose(1, 2).flatten(2)  # [B, Q, H * D]


class Attention(nn.Module):
    """GQA self-attention: `{q,k,v,o}_proj`, Qwen3's per-head `q_norm` / `k_norm` when `qk_norm`."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        qk_norm: bool = True,
        qkv_bias: bool = False,
        out_bias: bool = False,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if heads % kv_heads:
            raise DifflmError(f"{heads} attention heads cannot share {kv_heads} key/value heads evenly")
        self.head_dim, self.dropout = head_dim, dropout
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x: Tensor, ctx: AttentionContext, layer: int, eager: bool = False) -> Tensor:
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, -1, self.head_dim)  # [B, Q, H, D]
        k = self.k_proj(x).view(B, Q, -1, self.head_dim)  # [B, Q, H_kv, D]
        v = self.v_proj(x).view(B, Q, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.dropout if self.training else 0.0
        y = attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx, layer, dropout=dropout, eager=eager
        )
        return self.o_proj(y)  # [B, Q, C]


class MLP(nn.Module):
    """SwiGLU with Hugging Face's names: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm layer: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, hidden: int, inner: int, heads: int, kv_heads: int, head_dim: int, *,
                 eps: float = 1e-6, **attention: bool | float) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, eps=eps, **attention)
        self.mlp = MLP(hidden, inner)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, ctx: AttentionContext, layer: int, eager: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, layer, eager)
        return x + self.mlp(self.post_attention_layernorm(x))


class Denoiser(nn.Module):
    """Adapter from a Hugging Face masked LM built of these blocks to the difflm denoiser protocol:
    calling it returns the logits tensor [B, Q, V] (packed [N, V] with `logits_at`), not an output object.

    It registers the HF model's children (`model`, `lm_head`, ...) as its own and keeps the HF model
    as a plain attribute (`.hf`, for `save_pretrained`), so its `state_dict` keys are exactly the
    HF ones: a difflm checkpoint's `model.safetensors` plus `config.json` is a folder that
    `AutoModelForMaskedLM.from_pretrained` loads as is.
    """

    supports_kv_cache = True
    supports_logits_at = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hf", model)  # not a submodule: no "hf." prefix in state_dict
        self.config = model.config
        self.mask_token_id = model.mask_token_id
        self.logits_shift: int = model.logits_shift
        config = model.config  # the longest sequence, under either family's name for it
        self.max_length: int = getattr(config, "max_position_embeddings", None) or config.max_sequence_length

    def forward(
        self,
        input_ids: Tensor,
        attention_bias: Tensor | None = None,
        attention_mask: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """`t` and `cond` belong to the protocol and are unused: these models are time-agnostic (the
        mask tokens carry the noise level) and unconditional."""
        explicit = {} if position_ids is None else {"position_ids": position_ids}
        return self.hf(
            input_ids,
            attention_bias=attention_bias,
            attention_mask=attention_mask,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
            logits_at=logits_at,
            **explicit,
        ).logits

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return self.hf.kv_cache(batch, max_len, dtype)


def as_denoiser(model: nn.Module) -> Denoiser:
    """Wrap an HF masked LM of this module's blocks so that calling it returns logits."""
    return Denoiser(model)
