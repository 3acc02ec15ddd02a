"""LLaDA (`model_type: llada`: LLaDA-8B-Base/Instruct, LLaDA-1.5) run natively, with no trust_remote_code.

The published modeling file is OLMo's, with LLaDA's "llama" block; difflm computes the same thing
with its own blocks (`models/decoder.py`) under the published key names:

    model.transformer.wte                       token embedding [embedding_size, d_model]
    model.transformer.blocks.N.attn_norm        RMSNorm (eps from the config, 1e-5 for the 8B)
    model.transformer.blocks.N.{q,k,v}_proj     no biases (GQA when n_kv_heads < n_heads)
    model.transformer.blocks.N.attn_out         attention output projection
    model.transformer.blocks.N.ff_norm          RMSNorm
    model.transformer.blocks.N.ff_proj/up_proj  SwiGLU: ff_out(silu(ff_proj(x)) * up_proj(x))
    model.transformer.ln_f                      final RMSNorm
    model.transformer.ff_out                    LM head (absent when weight_tying: wte is reused)

Attention is bidirectional; RoPE (theta 500000 for the 8B, head_dim = d_model / n_heads) is applied
in float32 as the published `rope_full_precision` does. The mask token (126336) comes from the
config; logits have `embedding_size` columns, as published.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from difflm.hf_configs import LLaDAConfig
from difflm.models.decoder import attend, attention_context
from difflm.models.layers import AttentionContext, KVCache, RMSNorm

__all__ = ["LLaDAConfig", "LLaDABlock", "LLaDAModelLM"]


class LLaDABlock(nn.Module):
    """LLaDA's "llama" block: x + attn_out(attention(attn_norm(x))), then x + SwiGLU(ff_norm(x))."""

    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        hidden, inner, kv = c.d_model, c.mlp_hidden_size or c.mlp_ratio * c.d_model, c.n_kv_heads * c.head_dim
        qkv_bias = c.include_bias or c.include_qkv_bias
        self.head_dim, self.dropout = c.head_dim, c.attention_dropout
        self.attn_norm = RMSNorm(hidden, c.rms_norm_eps)
        self.q_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(hidden, hidden, bias=c.include_bias)
        self.ff_norm = RMSNorm(hidden, c.rms_norm_eps)
        self.ff_proj = nn.Linear(hidden, inner, bias=c.include_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=c.include_bias)
        self.ff_out = nn.Linear(inner, hidden, bias=c.include_bias)

    def forward(self, x: Tensor, ctx: AttentionContext, layer: int, eager: bool = False) -> Tensor:
        B, Q, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, Q, -1, self.head_dim).transpose(1, 2)  # [B, H, Q, D]
        k = self.k_proj(h).view(B, Q, -1, self.head_dim).transpose(1, 2)  # [B, H_kv, Q, D]
        v = self.v_proj(h).view(B, Q, -1, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        x = x + self.attn_out(attend(q, k, v, ctx, layer, dropout=dropout, eager=eager))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAStack(nn.Module):
    """The published `LLaDAModel`: everything lives under `transformer` (wte, blocks, ln_f, ff_out)."""

    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.rows, c.d_model),
                "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
                "ln_f": RMSNorm(c.d_model, c.rms_norm_eps),
            }
        )
        if not c.weight_tying:
            self.transformer["ff_out"] = nn.Linear(c.d_model, c.rows, bias=c.include_bias)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA with its LM head (published class name); `.logits` [B, Q, embedding_size]."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    logits_shift = 0

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAStack(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_bias: Tensor | None = None,
        attention_mask: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: Tensor | None = None,
    ) -> MaskedLMOutput:
        """Logits [B, Q, V] (packed [N, V] at `logits_at`) for Q inputs at positions offset..offset+Q."""
        c, net = self.config, self.model.transformer
        h = net.wte(input_ids)  # [B, Q, C]
        if c.input_emb_norm:
            h = h * c.d_model**0.5
        ctx = attention_context(
            *h.shape[:2], c.head_dim, c.rope_theta, dtype=h.dtype, device=h.device,
            attention_bias=attention_bias, attention_mask=attention_mask,
            position_offset=position_offset, kv_cache=kv_cache, attend_len=attend_len,
        )  # fmt: skip
        eager = c._attn_implementation == "eager"
        for index, block in enumerate(net.blocks):
            h = block(h, ctx, index, eager)
        h = net.ln_f(h if logits_at is None else h[logits_at.bool()])
        logits = F.linear(h, net.wte.weight) if c.weight_tying else net.ff_out(h)
        return MaskedLMOutput(logits=logits / c.d_model**0.5 if c.scale_logits else logits)

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of max_len slots per layer (default: max_sequence_length)."""
        c, param = self.config, next(self.parameters())
        length = c.max_sequence_length if max_len is None else max_len
        return KVCache(
            c.n_layers,
            batch,
            c.n_kv_heads,
            length,
            c.head_dim,
            param.device,
            param.dtype if dtype is None else dtype,
        )
