"""Qwen3-LLaDA: a Qwen3 decoder run as a bidirectional masked-diffusion denoiser.

The forward is difflm's own (`difflm.models.decoder`: RMSNorm, q/k-norm, RoPE, GQA attention with an
additive bias and the slot KV cache, SwiGLU); only transformers' public API is used around it
(`PretrainedConfig` / `PreTrainedModel`, the Auto classes), so no private calling convention of
transformers' Qwen3 can break it. The parameter names are Hugging Face Qwen3's (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `q_norm`, `mlp.gate_proj`, `input_layernorm`, `model.norm`,
`lm_head`), so converting a Qwen3 checkpoint (`difflm.convert.convert_qwen3`) is a pure copy and
`save_pretrained` / `from_pretrained` / `AutoModelForMaskedLM` work without trust_remote_code.

Attention is bidirectional by default. `attention_bias` [B, 1, Q|1, K] (0 visible, -inf hidden) adds
block attention, or a causal bias that reproduces the source LM (`Qwen3ForCausalLM`'s logits to 1e-5
in float32); `attention_mask` [B, K] hides padding keys. With difflm's `position_offset`, `kv_cache`
(a `KVCache` of the whole sequence) and `attend_len`, the Q inputs sit at positions offset..offset+Q,
write their keys/values there and attend over slots [0, attend_len) (`sampling/cache.py`).

Calling convention: the HF classes return `MaskedLMOutput` (`.logits` [B, L, V]) like any HF model;
code written against the difflm denoiser protocol wraps the model with `as_denoiser(model)`.
`attn_implementation` is "sdpa" (default) or "eager" (explicit float32 softmax); flash kernels cannot
take an arbitrary additive bias. RoPE is the default (unscaled) kind, as in every Qwen3 config.

difflm model family `qwen3_llada`: `Qwen3LLaDASpec` (the `model:` section) and `build_qwen3_llada`
(a fresh denoiser); `load_qwen3_llada` reads a Qwen3-LLaDA folder for `model.init_from`.
`import difflm` registers the model type with `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM`
(lazily, see `difflm.auto`); the config class lives in `difflm.hf_configs` for that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from difflm.errors import DifflmError
from difflm.fields import opt
from difflm.hf_configs import Qwen3LLaDAConfig
from difflm.models.decoder import DecoderLayer, Denoiser, as_denoiser, attention_context
from difflm.models.layers import KVCache, RMSNorm

__all__ = ["Qwen3LLaDAConfig", "Qwen3LLaDAModel", "Qwen3LLaDAForMaskedLM", "as_denoiser"]


class Qwen3LLaDAPreTrainedModel(PreTrainedModel):
    config_class = Qwen3LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True


class Qwen3LLaDAModel(Qwen3LLaDAPreTrainedModel):
    """The decoder stack: embed_tokens, layers, norm -> hidden states [B, Q, C] (bidirectional)."""

    def __init__(self, config: Qwen3LLaDAConfig):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, getattr(c, "pad_token_id", None))
        self.layers = nn.ModuleList(self.new_layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_init()

    @staticmethod
    def new_layer(c: Qwen3LLaDAConfig) -> DecoderLayer:
        """Qwen3's layer: q/k-norm, biases only where `attention_bias` (Dream overrides this)."""
        return DecoderLayer(
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            eps=c.rms_norm_eps,
            qk_norm=True,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_bias,
            dropout=c.attention_dropout,
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        """Hidden states after the final norm for the Q inputs at positions offset..offset+Q (or at
        `position_ids` [Q])."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, Q, C]
        ctx = attention_context(
            *h.shape[:2], self.config.head_dim, self.config.rope_theta, dtype=h.dtype, device=h.device,
            attention_bias=attention_bias, attention_mask=attention_mask,
            position_offset=position_offset, kv_cache=kv_cache, attend_len=attend_len, position_ids=position_ids,
        )  # fmt: skip
        eager = self.config._attn_implementation == "eager"
        for index, layer in enumerate(self.layers):
            h = layer(h, ctx, index, eager)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class Qwen3LLaDAForMaskedLM(Qwen3LLaDAPreTrainedModel):
    """Qwen3-LLaDA with the (possibly tied) LM head; keys equal `Qwen3ForCausalLM`'s.

    `logits_shift = 1` (Dream) makes position i's logits come from position i-1's output (position
    0 keeps its own), so `.logits[:, i]` always predicts token i; the sampler's KV cache then feeds
    one position more in front of a block (`sampling/cache.py`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class = Qwen3LLaDAModel
    logits_shift = 0

    def __init__(self, config: Qwen3LLaDAConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @property
    def mask_token_id(self) -> int:
        if self.config.mask_token_id is None:
            raise DifflmError("this Qwen3-LLaDA config has no mask_token_id; convert with `difflm convert`")
        return self.config.mask_token_id

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Logits [B, Q, V], or packed [N, V] at the true positions of `logits_at` [B, Q]. `t` and
        `cond` belong to the denoiser protocol and are unused (LLaDA is time-agnostic)."""
        hidden = self.model(
            input_ids,
            attention_bias,
            attention_mask,
            inputs_embeds,
            position_offset,
            kv_cache,
            attend_len,
            position_ids,
        ).last_hidden_state  # [B, Q, C]
        if self.logits_shift:
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)  # row i <- output i-1
        return MaskedLMOutput(logits=self.lm_head(hidden if logits_at is None else hidden[logits_at.bool()]))

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of max_len slots per layer (default: every position); GQA: key/value heads only."""
        cfg, param = self.config, next(self.parameters())
        return KVCache(
            cfg.num_hidden_layers,
            batch,
            cfg.num_key_value_heads,
            cfg.max_position_embeddings if max_len is None else max_len,
            cfg.head_dim,
            device=param.device,
            dtype=param.dtype if dtype is None else dtype,
        )


Qwen3LLaDADenoiser = Denoiser  # the adapter `as_denoiser` returns


# ----------------------------------------------------------------------------- difflm model family


ATTENTION_KINDS = ("sdpa", "eager")


@dataclass
class Qwen3LLaDASpec:
    """The `model:` section of family `qwen3_llada`: a Qwen3 architecture built from these fields.

    `vocab_size` and `mask_token_id` are derived from the tokenizer by the system. With
    `init_from`, the system copies the architecture fields from that folder's config.json and its
    weights, so the run config stored in every checkpoint rebuilds the model without `init_from`.
    """

    vocab_size: int = opt(1, "embedding rows (derived from the tokenizer)")
    mask_token_id: int | None = opt(None, "mask token id (derived from the tokenizer)")
    init_from: str | None = opt(
        None,
        "a Qwen3-LLaDA folder to start from: a `difflm convert` output or a difflm step folder "
        "(an HF Qwen3 checkpoint must be converted first); overrides the architecture fields",
    )
    hidden_size: int = opt(256, "model width")
    intermediate_size: int = opt(768, "SwiGLU MLP hidden width")
    num_hidden_layers: int = opt(4, "decoder layers")
    num_attention_heads: int = opt(4, "query heads")
    num_key_value_heads: int = opt(2, "key/value heads (GQA); divides the query heads")
    head_dim: int = opt(64, "width of one attention head")
    rope_theta: float = opt(1_000_000.0, "RoPE base frequency")
    max_position_embeddings: int = opt(2048, "longest sequence (prompt + answer)")
    rms_norm_eps: float = opt(1e-6, "RMSNorm epsilon")
    tie_word_embeddings: bool = opt(True, "share the LM head with the embedding")
    attention_dropout: float = opt(0.0, "dropout on attention probabilities")
    attn_implementation: str = opt("sdpa", "attention kernel (must take an additive bias): sdpa or eager")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) < 1:
                raise DifflmError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if kv < 1 or heads < 1 or heads % kv:
            raise DifflmError(
                f"model.num_attention_heads ({heads}) must be a positive multiple of model.num_key_value_heads ({kv})"
            )
        if self.attn_implementation not in ATTENTION_KINDS:
            raise DifflmError(
                f"model.attn_implementation is {self.attn_implementation!r}; choose one of {', '.join(ATTENTION_KINDS)}"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise DifflmError(
                f"model.mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )

    def hf_config(self) -> Qwen3LLaDAConfig:
        """The HF config of this architecture."""
        arch = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("init_from", "attn_implementation")
        }
        return Qwen3LLaDAConfig(**arch, attn_implementation=self.attn_implementation)


ARCHITECTURE_FIELDS = tuple(
    f.name
    for f in fields(Qwen3LLaDASpec)
    if f.name not in ("vocab_size", "mask_token_id", "init_from", "attn_implementation")
)


def spec_from_hf(config: Qwen3LLaDAConfig, spec: Qwen3LLaDASpec) -> Qwen3LLaDASpec:
    """`spec` with its architecture fields (and vocabulary size, mask id) read from an HF config."""
    values = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
    return replace(spec, **values, vocab_size=config.vocab_size, mask_token_id=config.mask_token_id)


def build_qwen3_llada(spec: Qwen3LLaDASpec) -> Qwen3LLaDADenoiser:
    """A freshly initialised Qwen3-LLaDA denoiser (weights from `init_from` are loaded by the system)."""
    if spec.mask_token_id is None:
        raise DifflmError(
            "model.mask_token_id is unset; it is derived from the tokenizer by the qwen3_llada systems"
        )
    return as_denoiser(Qwen3LLaDAForMaskedLM(spec.hf_config()))


def load_qwen3_llada(path: str, spec: Qwen3LLaDASpec) -> tuple[Qwen3LLaDADenoiser, Qwen3LLaDASpec]:
    """Load a Qwen3-LLaDA folder (float32) and the spec describing it; an HF Qwen3 folder is refused."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise DifflmError(f"model.init_from={path} has no config.json; point it at a Qwen3-LLaDA folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != Qwen3LLaDAConfig.model_type:
        raise DifflmError(
            f"model.init_from={path} is a {model_type} checkpoint; convert it first: difflm convert {path} OUT"
        )
    model = Qwen3LLaDAForMaskedLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=spec.attn_implementation, use_safetensors=True
    )
    return as_denoiser(model), spec_from_hf(model.config, spec)
