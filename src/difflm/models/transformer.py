"""difflm's own transformer: the denoiser of docs/architecture.md, and the AR baseline.

One pre-norm RoPE transformer serves every use: bidirectional masked-diffusion denoiser,
causal autoregressive baseline (`causal=True`, same code), time-conditioned denoiser
(AdaLN-Zero on a sinusoidal embedding of t) and the SGDD decoder (AdaLN-Zero on a semantic vector,
optionally also cross-attended as a few memory tokens). `forward` follows the denoiser protocol:
`logits = model(input_ids, attention_bias=None, t=None, cond=None)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflm.errors import DifflmError
from difflm.fields import REQUIRED, opt
from difflm.models.conditioning import Conditioning, pick, precompute
from difflm.models.layers import (
    MLPS,
    NORMS,
    AdaLNModulation,
    AttentionContext,
    CrossAttention,
    KVCache,
    SelfAttention,
    causal_bias,
    causal_rows_bias,
    combine_bias,
    gated_residual,
    make_norm,
    modulate,
    project,
    rope_cos_sin,
    rope_tables,
    timestep_embedding,
)
from difflm.models.quantize import int8_linears
from difflm.models.screen import top_tokens

TIME_FREQ_DIM = 256  # width of the sinusoidal features of t, before the time MLP
# skipping unread columns in the last block costs a few more small calls (two projections
# instead of one, gathers): worth it from about this much saved work (at batch 1 on this
# project's CPU: one row of a 256-wide block; a BD3 step's 1-4 rows of a 128-wide one are not)
SKIP_MIN_FLOPS = 2_000_000


@dataclass
class TransformerConfig:
    """Shape and behaviour of `Transformer`."""

    vocab_size: int = opt(REQUIRED, "number of token ids, the mask token included")
    block_size: int = opt(REQUIRED, "maximum sequence length (positions 0..block_size-1)")
    n_layer: int = opt(6, "number of transformer blocks")
    n_head: int = opt(6, "attention heads per block")
    n_embd: int = opt(384, "model width; must be divisible by n_head")
    ffn_hidden: int | None = opt(None, "MLP hidden width (default 4 * n_embd)")
    mlp: str = opt(
        "gelu_exact",
        f"MLP kind: one of {sorted(MLPS)} (gelu: GPT-2's tanh form, 4-5x the erf form's cost on the CPU)",
    )
    dropout: float = opt(0.0, "dropout on embeddings, attention and residuals")
    causal: bool = opt(False, "causal attention: the autoregressive baseline from the same code")
    time_conditioning: bool = opt(False, "condition every block on t in [0, 1] through AdaLN-Zero")
    cond_dim: int | None = opt(
        None, "width of a semantic vector [B, cond_dim] added to the AdaLN-Zero conditioning (SGDD)"
    )
    cond_tokens: int = opt(0, "also cross-attend to the semantic vector as this many memory tokens (0 = off)")
    rope: bool = opt(
        True, "rotary positions in attention; false leaves positions to learned_positions (GPT-2)"
    )
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    learned_positions: bool = opt(
        False,
        "also add a learned absolute position embedding: with RoPE alone an all-mask input "
        "gives every position the same output, so a decoder with no prompt to anchor it (SGDD) "
        "predicts the same token everywhere",
    )
    norm: str = opt("rms", "normalisation: rms (RMSNorm, LLaMA) or layer (LayerNorm, GPT-2)", choices=NORMS)
    norm_eps: float = opt(1e-6, "epsilon of the norms")
    bias: bool = opt(False, "use biases in linear layers")
    tie_embeddings: bool = opt(True, "share the output head with the token embedding")
    logits_shift: int = opt(
        0,
        "1: position i's logits come from position i-1's output (Dream), so a diffusion model "
        "started from an AR model's weights (train.init_from) keeps its next-token head; 0: its own",
        choices=(0, 1),
    )
    lookahead_row: bool = opt(
        False,
        "block diffusion with logits_shift=1: read each block's first token from an extra row (the "
        "token before the block again) that sees the block, instead of from the previous block's "
        "last row, which cannot; models/block_attention.py",
    )
    mask_token_id: int | None = opt(None, "id of the [MASK] token (diffusion)")
    pad_token_id: int | None = opt(None, "id of the padding token")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise DifflmError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise DifflmError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise DifflmError(
                f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be even for RoPE; change n_embd or n_head"
            )
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise DifflmError(f"model.ffn_hidden must be positive or null, got {self.ffn_hidden}")
        if self.norm not in NORMS:
            raise DifflmError(f"model.norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise DifflmError(f"model.mlp must be one of {sorted(MLPS)}, got {self.mlp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DifflmError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.cond_dim is not None and self.cond_dim <= 0:
            raise DifflmError(f"model.cond_dim must be positive or null, got {self.cond_dim}")
        if self.cond_tokens < 0:
            raise DifflmError(f"model.cond_tokens must be >= 0, got {self.cond_tokens}")
        if self.cond_tokens and self.cond_dim is None:
            raise DifflmError("model.cond_tokens > 0 needs model.cond_dim (the semantic vector width)")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise DifflmError("model.rope_theta and model.norm_eps must be positive")
        if self.logits_shift not in (0, 1):
            raise DifflmError(f"model.logits_shift must be 0 or 1, got {self.logits_shift}")
        if self.logits_shift and self.causal:
            raise DifflmError(
                "model.logits_shift=1 is for bidirectional diffusion; a causal model shifts its targets"
            )
        if self.lookahead_row and not self.logits_shift:
            raise DifflmError(
                "model.lookahead_row is for shifted models (model.logits_shift=1): an unshifted block "
                "reads its first token from its own row, which already sees the block"
            )
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise DifflmError(f"model.{name} = {value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def conditioned(self) -> bool:
        """True when blocks use AdaLN-Zero (time and/or semantic conditioning)."""
        return self.time_conditioning or self.cond_dim is not None


def _broadcasts(bias: Tensor, shape: tuple[int, ...]) -> bool:
    """True when bias has len(shape) dims, each equal to the target's or 1."""
    return bias.dim() == len(shape) and all(b in (1, n) for b, n in zip(bias.shape, shape, strict=True))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, MLP; AdaLN-Zero when conditioned."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        affine = not cfg.conditioned  # with AdaLN the scale comes from the modulation
        self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, affine, cfg.bias)
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout)
        self.norm_cross = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, bias=cfg.bias) if cfg.cond_tokens else None
        self.cross_attn = (
            CrossAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout) if cfg.cond_tokens else None
        )
        self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, affine, cfg.bias)
        self.mlp = MLPS[cfg.mlp](cfg.n_embd, cfg.ffn_hidden or 4 * cfg.n_embd, cfg.bias, cfg.dropout)
        self.modulation = AdaLNModulation(cfg.n_embd, 6) if cfg.conditioned else None

    def forward(
        self,
        x: Tensor,
        ctx: AttentionContext,
        layer: int,
        c: Tensor | None = None,
        memory: Tensor | None = None,
        mods: tuple[Tensor, ...] | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        cols: Tensor | None = None,
    ) -> Tensor:
        """mods / memory_kv: this block's modulations and memory keys/values, precomputed
        (`Conditioning`); otherwise they are computed from c and memory. cols [Q']: compute only
        these positions' outputs ([B, Q', C]; all positions still serve as keys and values)."""
        if mods is None:
            mods = self.modulation(c) if self.modulation is not None else (None,) * 6
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods  # [B, C] each, or None
        y = self.attn(modulate(self.norm1(x), shift_a, scale_a), ctx, layer, cols)
        x = gated_residual(x if cols is None else x[:, cols], y, gate_a)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), memory, memory_kv)
        return gated_residual(x, self.mlp(modulate(self.norm2(x), shift_m, scale_m)), gate_m)


class Transformer(nn.Module):
    """The denoiser: token ids [B, Q] -> logits [B, Q, V] (models/protocol.py: `Denoiser`)."""

    supports_kv_cache = True
    supports_logits_at = True
    supports_row_offsets = True  # position_offset [B] with a cache (models/protocol.py)
    logits_shift = 0

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_token_id = config.mask_token_id
        self.logits_shift = config.logits_shift
        self.lookahead_row = config.lookahead_row
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.block_size, C) if config.learned_positions else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config.norm, C, config.norm_eps, not config.conditioned, config.bias)
        self.final_modulation = AdaLNModulation(C, 2) if config.conditioned else None
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, C), nn.SiLU(), nn.Linear(C, C))
        if config.cond_dim is not None:
            self.cond_proj = nn.Linear(config.cond_dim, C)
            # stands in for `cond` when cond=None: the "unconditional" input of classifier-free
            # guidance; living in cond space it feeds the AdaLN and cross-attention paths alike
            self.null_cond = nn.Parameter(torch.zeros(config.cond_dim))
        if config.cond_tokens:
            self.memory_proj = nn.Linear(config.cond_dim, config.cond_tokens * C)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()
        self.row_flops = self._last_block_row_flops()  # fixed by the shapes: not summed at every forward

    def _init_weights(self) -> None:
        """normal(0, 0.02); residual projections / sqrt(2 n_layer) (GPT-2); AdaLN-Zero parts zero."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.out_proj.weight, mean=0.0, std=residual_std)
            if block.cross_attn is not None:  # no gate on cross-attention: zero it to start as identity
                nn.init.zeros_(block.cross_attn.out_proj.weight)
        for module in self.modules():
            if isinstance(module, AdaLNModulation):
                module.reset_parameters()
        if self.config.cond_dim is not None:
            nn.init.normal_(self.null_cond, mean=0.0, std=0.02)

    @property
    def max_length(self) -> int:
        return self.config.block_size

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied head counted once); optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_emb.weight.numel() if exclude_embeddings else total

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_bias: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        position_offset: int | Tensor = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: Tensor | None = None,
        position_ids: Tensor | None = None,
        head: tuple[Tensor, Tensor | None] | None = None,
        conditioning: Conditioning | None = None,
        cond_rows: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, Q, V] for input_ids [B, Q] at absolute positions position_offset..+Q, or
        packed [N, V] at the N true positions of `logits_at` [B, Q] (the vocabulary projection is
        the largest matmul with a big vocabulary: training scores masked positions only, the
        sampler one block).

        attention_bias: additive, broadcastable to [B, 1, Q, K] (K = Q, or attend_len with a cache);
        the causal bias is added automatically when config.causal.
        t: [B] or scalar times in [0, 1]; None means t = 0. Ignored without time_conditioning, so
        samplers can pass t to any denoiser.
        cond: [B, cond_dim] semantic vectors; None means unconditional (the learned null vector).
        kv_cache: write this input's keys/values at slots [position_offset, +Q) and attend over
        slots [0, attend_len) (default position_offset + Q). With a cache, position_offset may be
        a LongTensor [B]: each row at its own positions and slots (block-diffusion rows at
        different blocks, sampling/ragged.py); the bias then hides each row's unwritten slots.
        position_ids: [Q] explicit positions instead of position_offset..+Q: block diffusion
        feeds the noisy and the clean copy of a sequence, both at positions 0..L-1 (with a cache,
        the keys still go to slots [position_offset, +Q): the sampler's lookahead row).
        head: (weight [K, C], bias [K] or None) of K vocabulary rows to score instead of all V
        (logits [..., K]; see `output_rows`).
        conditioning, cond_rows [B]: the products of cond precomputed for a decode (see
        `conditioning`); the rows of this batch are rows `cond_rows` of it, and cond is unused.
        """
        if input_ids.dim() != 2:
            raise DifflmError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        cols = self._output_columns(logits_at, kv_cache is not None or attention_bias is not None)
        h = self.hidden(
            self.tok_emb(input_ids),
            attention_bias=attention_bias,
            t=t,
            cond=cond,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
            position_ids=position_ids,
            conditioning=conditioning,
            cond_rows=cond_rows,
            last_cols=cols,
        )  # [B, Q, C], or [B, Q', C] at cols
        if cols is not None:  # back in place: the shift and `logits_at` read only these columns
            h = h.new_zeros(*input_ids.shape, h.shape[-1]).index_copy_(1, cols, h)
        if self.logits_shift:
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)  # row i <- output i-1 (row 0 keeps its own)
        h = h if logits_at is None else h[logits_at.bool()]
        return self.project_hidden(h, head)  # [.., V] or [.., K]

    def _output_columns(self, logits_at: Tensor | None, has_bias: bool) -> Tensor | None:
        """Columns [Q'] whose final outputs the logits at `logits_at` [B, Q] read (any row), or
        None for all of them. The last block then computes only those (its keys and values still
        come from every position): at batch 1 a denoiser step needs just the masked positions.
        A causal model without a bias or cache keeps SDPA's causal path instead."""
        if logits_at is None or (self.config.causal and not has_bias):
            return None
        read = logits_at.bool().any(0)  # [Q]
        if self.logits_shift:  # row i reads output i - 1, row 0 its own
            read = torch.cat([read[1:], read.new_zeros(1)]) | torch.cat([read[:1], read.new_zeros(len(read) - 1)])
        cols = read.nonzero().flatten()
        saved = (len(read) - len(cols)) * self.row_flops
        return cols if saved >= SKIP_MIN_FLOPS else None

    def _last_block_row_flops(self) -> int:
        """Multiply-adds x 2 the last block spends on one row's output beyond its key and value."""
        block, C = self.blocks[-1], self.config.n_embd
        per_row = C * C + block.attn.out_proj.weight.numel() + sum(p.numel() for p in block.mlp.parameters())
        if block.cross_attn is not None:
            per_row += block.cross_attn.q.weight.numel() + block.cross_attn.out_proj.weight.numel()
        return 2 * per_row

    def top_tokens(self, h: Tensor, k: int) -> Tensor:
        """The k most likely token ids [N, k] of final hidden states h [N, C] (models/screen.py)."""
        return top_tokens(h, self.lm_head.weight, None, k)

    def int8_(self) -> int:
        """Every linear layer but the (tied) output head in int8, in place, for CPU inference
        (models/quantize.py); returns how many. The last block then computes every column: its
        query projection, int8 now, can no longer be sliced off the fused qkv (`_output_columns`)."""
        self.row_flops = 0
        return int8_linears(self, keep=("lm_head",))

    def output_rows(self, vocab: Tensor) -> tuple[Tensor, Tensor | None]:
        """The output projection's rows of token ids vocab [K]: the `head` that scores only them."""
        return self.lm_head.weight[vocab].contiguous(), None

    def project_hidden(self, h: Tensor, head: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """Logits of final hidden states h [..., C], as `forward` computes them (all V, or `head`)."""
        return project(h, self.lm_head.weight) if head is None else project(h, *head)

    def hidden(
        self,
        x: Tensor,
        *,
        attention_bias: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        position_offset: int | Tensor = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        position_ids: Tensor | None = None,
        conditioning: Conditioning | None = None,
        cond_rows: Tensor | None = None,
        last_cols: Tensor | None = None,
    ) -> Tensor:
        """The trunk on input embeddings x [B, Q, C]: positions, blocks, final norm -> [B, Q, C]
        (with last_cols [Q'], the last block computes only those positions: [B, Q', C]).

        `forward` feeds it the token embeddings; a model whose inputs are not tokens (Diffusion
        Forcing's noisy embeddings, `models/dfgpt.py`) feeds its own and puts its own head on top.
        """
        if x.dim() != 3 or x.shape[-1] != self.config.n_embd:
            raise DifflmError(f"embeddings must be [batch, length, {self.config.n_embd}], got {tuple(x.shape)}")
        B, Q, _ = x.shape
        ctx = self._attention_context(
            B, Q, attention_bias, position_offset, kv_cache, attend_len, x.device, position_ids
        )
        picked = pick(conditioning, cond_rows, t, B)
        c = memory = None
        if picked is None:
            c = self._conditioning(B, t, cond, x.device)  # [B, C] or None
            memory = self._memory(B, cond) if self.config.cond_tokens else None  # [B, T, C]
        if self.pos_emb is not None and position_ids is not None:
            x = x + self.pos_emb(position_ids)
        elif self.pos_emb is not None and isinstance(position_offset, Tensor):
            x = x + self.pos_emb(position_offset[:, None] + torch.arange(Q, device=x.device))
        elif self.pos_emb is not None:
            x = x + self.pos_emb.weight[position_offset : position_offset + Q]
        x = self.drop(x)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            cols = last_cols if layer == last else None
            if picked is None:
                x = block(x, ctx, layer, c, memory, cols=cols)
            else:
                kv = None if picked.memory_kv is None else picked.memory_kv[layer]
                x = block(x, ctx, layer, mods=picked.modulations[layer], memory_kv=kv, cols=cols)
        if picked is not None:
            shift, scale = picked.final
        else:
            shift, scale = self.final_modulation(c) if self.final_modulation is not None else (None, None)
        return modulate(self.norm_f(x), shift, scale)  # [B, Q, C]

    @torch.no_grad()
    def conditioning(self, cond: Tensor | None, t_grid: Tensor | None = None) -> Conditioning:
        """The AdaLN modulations (at every t of t_grid [G]) and memory keys/values of conditioning
        rows cond [R, cond_dim] (None: the one unconditional row), for `forward(conditioning=)`."""
        cfg = self.config
        if cfg.cond_dim is None:
            raise DifflmError("this transformer has no cond_dim: there is no conditioning to precompute")
        rows = self._cond_or_null(1 if cond is None else len(cond), cond)  # [R, cond_dim]
        return precompute(
            self.cond_proj(rows),
            self._time_embedding if cfg.time_conditioning else None,
            t_grid,
            [block.modulation for block in self.blocks],
            self.final_modulation,
            self._memory(len(rows), rows) if cfg.cond_tokens else None,
            [block.cross_attn for block in self.blocks] if cfg.cond_tokens else (),
        )

    def _time_embedding(self, t: Tensor) -> Tensor:
        """t [N] -> its AdaLN input [N, C] (the float32 features in the model's dtype: a model cast to
        bfloat16 for inference takes float32 times)."""
        features = timestep_embedding(t, TIME_FREQ_DIM)  # [N, TIME_FREQ_DIM]
        return self.time_mlp(features.to(self.tok_emb.weight.dtype))

    def _attention_context(
        self,
        B: int,
        Q: int,
        bias: Tensor | None,
        start: int,
        cache: KVCache | None,
        attend_len: int | None,
        device: torch.device,
        positions: Tensor | None = None,
    ) -> AttentionContext:
        """Validate positions / cache / bias once and build what every layer's attention needs."""
        cfg = self.config
        if positions is not None:
            return self._explicit_positions_context(B, Q, bias, start, cache, attend_len, positions)
        if isinstance(start, Tensor):
            return self._row_offsets_context(B, Q, bias, start, cache, attend_len)
        if start < 0 or start + Q > cfg.block_size:
            raise DifflmError(
                f"positions [{start}, {start + Q}) exceed block_size {cfg.block_size}; "
                "shorten the input or raise model.block_size"
            )
        K = self._check_cache(B, Q, bias, start, cache, attend_len)
        is_causal = cfg.causal and bias is None and cache is None  # SDPA's fused causal path
        if cfg.causal and not is_causal:
            # with a cache: rows = absolute query positions start..start+Q, columns = key slots 0..K
            causal = causal_bias(Q, device) if cache is None else causal_rows_bias(start, Q, K, device)
            bias = combine_bias(bias, causal)  # [., 1, Q, K]
        cos, sin = rope_cos_sin(start, Q, cfg.head_dim, cfg.rope_theta, device) if cfg.rope else (None, None)
        return AttentionContext(cos, sin, bias, is_causal, cache, start, 0 if cache is None else K)

    def _check_cache(
        self, B: int, Q: int, bias: Tensor | None, start: int, cache: KVCache | None, attend_len: int | None
    ) -> int:
        """Raise DifflmError unless the cache request and the bias fit; return the key count."""
        cfg = self.config
        if cache is None and attend_len is not None:
            raise DifflmError("attend_len needs a kv_cache; pass kv_cache=KVCache.for_model(...)")
        if cache is not None:
            if (cache.n_layer, cache.n_head, cache.head_dim) != (cfg.n_layer, cfg.n_head, cfg.head_dim):
                raise DifflmError(
                    "KV cache shape does not match the model; build it with KVCache.for_model(model, ...)"
                )
            attend_len = start + Q if attend_len is None else attend_len
            cache.check(B, start, Q, attend_len)
        K = Q if cache is None else attend_len
        if bias is not None and not _broadcasts(bias, (B, 1, Q, K)):
            raise DifflmError(
                f"attention_bias of shape {tuple(bias.shape)} does not broadcast to [B, 1, Q, K] = {[B, 1, Q, K]}"
            )
        return K

    def _explicit_positions_context(
        self,
        B: int,
        Q: int,
        bias: Tensor | None,
        start: int,
        cache: KVCache | None,
        attend_len: int | None,
        positions: Tensor,
    ) -> AttentionContext:
        """The attention context for explicit position_ids [Q] (block-diffusion layouts; with a
        cache, the keys still go to slots [start, start+Q))."""
        cfg = self.config
        if cfg.causal:
            raise DifflmError("position_ids is for non-causal layouts (block diffusion)")
        if positions.shape != (Q,) or int(positions.min()) < 0 or int(positions.max()) >= cfg.block_size:
            raise DifflmError(
                f"position_ids must be [{Q}] with values in [0, block_size={cfg.block_size}), "
                f"got shape {tuple(positions.shape)}"
            )
        K = self._check_cache(B, Q, bias, start, cache, attend_len)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta) if cfg.rope else (None, None)
        return AttentionContext(cos, sin, bias, False, cache, start, 0 if cache is None else K)

    def _row_offsets_context(
        self, B: int, Q: int, bias: Tensor | None, starts: Tensor, cache: KVCache | None, attend_len: int | None
    ) -> AttentionContext:
        """The attention context when row b sits at positions and cache slots starts[b]..+Q."""
        cfg = self.config
        if cache is None or attend_len is None or cfg.causal:
            raise DifflmError("per-row position offsets need a kv_cache, an attend_len and a non-causal model")
        if starts.shape != (B,) or int(starts.min()) < 0 or int(starts.max()) + Q > min(cfg.block_size, attend_len):
            raise DifflmError(
                f"per-row position offsets must be [{B}] with offset + {Q} <= min(block_size, attend_len), "
                f"got shape {tuple(starts.shape)}"
            )
        K = self._check_cache(B, Q, bias, 0, cache, attend_len)
        cos = sin = None
        if cfg.rope:
            positions = starts[:, None] + torch.arange(Q, device=starts.device)  # [B, Q]
            cos, sin = (t.view(B, 1, Q, -1) for t in rope_tables(positions.flatten(), cfg.head_dim, cfg.rope_theta))
        return AttentionContext(cos, sin, bias, False, cache, starts, K)

    def _conditioning(
        self, B: int, t: Tensor | None, cond: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """The AdaLN-Zero conditioning vector c [B, C], or None for an unconditioned model."""
        cfg = self.config
        if cond is not None and cfg.cond_dim is None:
            raise DifflmError("cond was given but the model has no cond_dim; set model.cond_dim or drop cond")
        if not cfg.conditioned:
            return None
        c = None
        if cfg.time_conditioning:
            t = torch.zeros(B, device=device) if t is None else t
            if t.dim() == 0:
                t = t.expand(B)
            if t.numel() != B:
                raise DifflmError(
                    f"t must be a scalar or have one value per sequence ({B}), got shape {tuple(t.shape)}"
                )
            c = self._time_embedding(t.reshape(B).to(device))  # [B, C]
        if cfg.cond_dim is not None:
            c_sem = self.cond_proj(self._cond_or_null(B, cond))  # [B, C]
            c = c_sem if c is None else c + c_sem
        return c

    def _cond_or_null(self, B: int, cond: Tensor | None) -> Tensor:
        if cond is None:
            return self.null_cond.expand(B, -1)  # [B, cond_dim]
        if tuple(cond.shape) != (B, self.config.cond_dim):
            raise DifflmError(f"cond must be [{B}, {self.config.cond_dim}], got shape {tuple(cond.shape)}")
        return cond.to(self.null_cond.dtype)  # float32 vectors into a model cast to bfloat16

    def _memory(self, B: int, cond: Tensor | None) -> Tensor:
        """The semantic vector as cond_tokens memory tokens [B, T, C] for cross-attention."""
        mem = self.memory_proj(self._cond_or_null(B, cond))  # [B, T * C]
        return mem.view(B, self.config.cond_tokens, self.config.n_embd)
