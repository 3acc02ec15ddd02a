"""A BERT stack as SGDD's decoder: starts as the pretrained encoder, conditioned without harm.

SGDD's from-scratch decoder must learn English and inversion at once. This decoder instead starts
from the frozen encoder package's own transformer (MiniLM: 6 post-LN layers, 384 wide, WordPiece),
so step 0 already knows the language and training only has to learn to follow the vector.

Everything added is zero at init, so at step 0 the model *is* the pretrained network with an MLM
head (its decoder tied to the word embeddings):

- AdaLN-Zero after each layer: c = cond_proj(vector) [+ time_mlp(t)] gives a shift and a scale,
  h <- h * (1 + scale) + shift, from a zero-initialised projection.
- Optional memory tokens: cross-attention from the sequence to `cond_tokens` vectors projected
  from the semantic vector, added to the residual through a zero-initialised output projection.

The MiniLM package ships no MLM head, so the head's transform starts as the identity map (dense =
I, bias 0) followed by GELU and a fresh LayerNorm; with HF's `BertForMaskedLM` key names mapped by
`HF_KEY_RENAMES`, a `BertForMaskedLM` holding the same weights gives the same logits (the tests
check it).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflm.errors import DifflmError
from difflm.models.conditioning import Conditioning, pick, precompute
from difflm.models.layers import AdaLNModulation, CrossAttention, modulate, sdpa, timestep_embedding
from difflm.models.quantize import int8_linears
from difflm.models.screen import top_tokens
from difflm.models.transformer import TIME_FREQ_DIM

LN_EPS = 1e-12  # BERT's layer_norm_eps

# HF BertModel / BertForMaskedLM key -> this module's key (the "bert." prefix is stripped first)
HF_KEY_RENAMES = (
    (r"^embeddings\.word_embeddings\.", "tok_emb."),
    (r"^embeddings\.position_embeddings\.", "pos_emb."),
    (r"^embeddings\.token_type_embeddings\.", "type_emb."),
    (r"^embeddings\.LayerNorm\.", "emb_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.o."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm2."),
    (r"^cls\.predictions\.transform\.dense\.", "head_dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "head_norm."),
    (r"^cls\.predictions\.bias$", "head_bias"),
)


def rename_hf_key(key: str) -> str | None:
    """This module's name for a HF BERT key, or None for keys it has no use for (pooler, ids)."""
    key = key.removeprefix("bert.")
    for pattern, repl in HF_KEY_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


class BertLayer(nn.Module):
    """Post-LN BERT layer: LN(x + attn(x)), then LN(h + ffn(h)) (GELU, erf form)."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.up, self.down = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        B, L, C = x.shape
        q, k, v = (
            proj(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        p = self.dropout if self.training else 0.0
        a = sdpa(q, k, v, bias, p)  # [B, H, L, D]
        h = self.norm1(x + self.drop(self.o(a.transpose(1, 2).reshape(B, L, C))))
        return self.norm2(h + self.drop(self.down(F.gelu(self.up(h)))))


class BertDecoder(nn.Module):
    """Token ids [B, L] (+ t, semantic vector) -> logits; the SGDD decoder protocol."""

    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        ffn_hidden: int,
        cond_dim: int,
        dropout: float = 0.1,
        time_conditioning: bool = True,
        cond_tokens: int = 0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise DifflmError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}")
        self.block_size, self.cond_tokens = block_size, cond_tokens
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.type_emb = nn.Embedding(2, n_embd)  # BERT's segment table; every token is segment 0
        self.emb_norm = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(n_embd, n_head, ffn_hidden, dropout) for _ in range(n_layer))
        self.head_dense = nn.Linear(n_embd, n_embd)
        self.head_norm = nn.LayerNorm(n_embd, eps=LN_EPS)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.cond_proj = nn.Linear(cond_dim, n_embd)
        self.null_cond = nn.Parameter(torch.randn(cond_dim) * 0.02)  # CFG's unconditional input
        self.time_mlp = (
            nn.Sequential(nn.Linear(TIME_FREQ_DIM, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))
            if time_conditioning
            else None
        )
        self.modulations = nn.ModuleList(AdaLNModulation(n_embd, 2) for _ in range(n_layer))
        self.cross = nn.ModuleList(
            CrossAttention(n_embd, n_head, True, dropout) for _ in range(n_layer if cond_tokens else 0)
        )
        self.memory_proj = nn.Linear(cond_dim, cond_tokens * n_embd) if cond_tokens else None
        self._init_new_parts()

    @torch.no_grad()
    def _init_new_parts(self) -> None:
        """What the pretrained checkpoint lacks: identity head transform, zero cross-attention out."""
        self.head_dense.weight.copy_(torch.eye(self.head_dense.weight.shape[0]))
        self.head_dense.bias.zero_()
        for cross in self.cross:
            nn.init.zeros_(cross.out_proj.weight)
            nn.init.zeros_(cross.out_proj.bias)

    @torch.no_grad()
    def load_pretrained(self, state: dict[str, Tensor]) -> None:
        """Copy a HF BERT state dict (BertModel or BertForMaskedLM keys) into the stack and embeddings."""
        own = self.state_dict()
        loaded = set()
        for key, value in state.items():
            name = rename_hf_key(key)
            if name is None:
                continue
            if name == "pos_emb.weight":
                if value.shape[0] < self.block_size:
                    raise DifflmError(
                        f"the encoder has {value.shape[0]} positions, fewer than model.block_size="
                        f"{self.block_size}: lower block_size"
                    )
                value = value[: self.block_size]
            if name not in own or own[name].shape != value.shape:
                raise DifflmError(
                    f"encoder weight {key} {tuple(value.shape)} does not fit the decoder "
                    f"({tuple(own[name].shape) if name in own else 'no such parameter'}): the decoder "
                    "must be shaped like the encoder"
                )
            own[name].copy_(value)
            loaded.add(name)
        missing = [
            k for k in own if k.startswith(("tok_emb", "pos_emb", "emb_norm", "layers.")) and k not in loaded
        ]
        if missing:
            raise DifflmError(
                f"the encoder checkpoint lacks {len(missing)} decoder weights, e.g. {missing[0]}"
            )

    def _memory(self, vectors: Tensor) -> Tensor | None:
        """Semantic vectors [B, K] as cond_tokens memory tokens [B, T, C] (None without them)."""
        if self.memory_proj is None:
            return None
        return self.memory_proj(vectors).view(len(vectors), self.cond_tokens, -1)

    @torch.no_grad()
    def conditioning(self, cond: Tensor, t_grid: Tensor | None = None) -> Conditioning:
        """The AdaLN modulations (at every t of t_grid [G]) and memory keys/values of conditioning
        rows cond [R, K], for `forward(conditioning=)` (see models/conditioning.py)."""
        return precompute(
            self.cond_proj(cond),
            self._time_embedding if self.time_mlp is not None else None,
            t_grid,
            self.modulations,
            memory=self._memory(cond),
            crosses=self.cross,
        )

    def _time_embedding(self, t: Tensor) -> Tensor:
        """t [N] -> its AdaLN input [N, C]."""
        return self.time_mlp(timestep_embedding(t, TIME_FREQ_DIM))

    def _conditioning(self, B: int, t: Tensor | None, cond: Tensor | None) -> Tensor:
        vector = self.null_cond.expand(B, -1) if cond is None else cond  # [B, K]
        c = self.cond_proj(vector)  # [B, C]
        if self.time_mlp is not None:
            t = torch.zeros(B, device=c.device) if t is None else t.expand(B) if t.dim() == 0 else t
            c = c + self._time_embedding(t.reshape(B).to(c.device))
        return c

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_bias: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        logits_at: Tensor | None = None,
        head: tuple[Tensor, Tensor | None] | None = None,
        conditioning: Conditioning | None = None,
        cond_rows: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, L, V], or packed [N, V] at the true positions of `logits_at` [B, L].

        attention_bias: additive, broadcastable to [B, 1, L, L] (the pad mask); cond: [B, K]
        semantic vectors or None (the learned null vector); t: [B] or scalar mask fraction;
        head: (weight [K, C], bias [K]) of K vocabulary rows to score instead of all V (logits
        [..., K]; see `output_rows`); conditioning, cond_rows [B]: as `Transformer.forward` (cond
        is then unused).
        """
        B, L = input_ids.shape
        if L > self.block_size:
            raise DifflmError(f"{L} tokens exceed model.block_size={self.block_size}: shorten the text")
        picked = pick(conditioning, cond_rows, t, B)
        if picked is None:
            c = self._conditioning(B, t, cond)
            memory = self._memory(self.null_cond.expand(B, -1) if cond is None else cond)
            mods = [modulation(c) for modulation in self.modulations]  # per layer: shift, scale [B, C]
            memory_kv = None if memory is None else [cross.keys_values(memory) for cross in self.cross]
        else:
            mods, memory_kv = picked.modulations, picked.memory_kv
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:L] + self.type_emb.weight[0]
        x = self.drop(self.emb_norm(x))  # [B, L, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_bias)
            if memory_kv is not None:
                x = x + self.cross[i](x, None, memory_kv[i])
            x = modulate(x, *mods[i])
        h = x if logits_at is None else x[logits_at.bool()]
        h = self.head_norm(F.gelu(self.head_dense(h)))
        return self.project_hidden(h, head)  # [.., V] or [.., K]

    def project_hidden(self, h: Tensor, head: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """Logits of final (transformed) hidden states h [..., C], as `forward` computes them."""
        return F.linear(h, *(head or (self.tok_emb.weight, self.head_bias)))

    def top_tokens(self, h: Tensor, k: int) -> Tensor:
        """The k most likely token ids [N, k] of final hidden states h [N, C] (models/screen.py)."""
        return top_tokens(h, self.tok_emb.weight, self.head_bias, k)

    def int8_(self) -> int:
        """Every linear layer in int8, in place, for CPU inference (models/quantize.py; the output
        head is the embedding table, which stays float32); returns how many."""
        return int8_linears(self)

    def output_rows(self, vocab: Tensor) -> tuple[Tensor, Tensor | None]:
        """The tied output projection's rows of token ids vocab [K]: the `head` that scores only them."""
        return self.tok_emb.weight[vocab].contiguous(), self.head_bias[vocab].contiguous()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
