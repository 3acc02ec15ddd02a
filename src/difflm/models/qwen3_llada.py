"""Qwen3-LLaDA: a Hugging Face Qwen3 decoder run as a bidirectional masked-diffusion denoiser.

The model reuses Qwen3's decoder layers, norms, rotary embedding and LM head unchanged (the classes
subclass `Qwen3Model` / `Qwen3PreTrainedModel`), so the state-dict keys equal `Qwen3ForCausalLM`'s and
converting a checkpoint (`difflm.convert.convert_qwen3`) is a pure copy. Only attention changes:

- every attention module gets `is_causal = False`, so SDPA / eager attend to all keys by default;
- the layers receive a ready 4D additive mask through the mask-mapping dict that `Qwen3Model.forward`
  accepts in place of a 2D `attention_mask` (the supported way to bypass `create_causal_mask`). The mask
  is `attention_bias` [B, 1, Q, K] (0 visible, -inf hidden; block attention, or a causal bias to
  reproduce the source LM) plus the padding of `attention_mask` [B, L] on the key axis.

Calling convention: the HF classes return `MaskedLMOutput` (`.logits` [B, L, V]) like any HF model, so
`save_pretrained`, `from_pretrained` and `AutoModelForMaskedLM` work as usual. Code written against the
difflm denoiser protocol (a module returning the logits tensor) wraps the model with `as_denoiser(model)`;
the adapter's state-dict keys are the HF model's, so a difflm checkpoint folder is an HF folder too.

difflm model family `qwen3_llada`: `Qwen3LLaDASpec` (the `model:` section) and `build_qwen3_llada`
(a fresh denoiser); `load_qwen3_llada` reads a Qwen3-LLaDA folder for `model.init_from`.

Block-wise KV caching (`sample.cache=prefix|dual`): the denoiser's forward takes difflm's
`position_offset`, `kv_cache` (a `KVCache` of the whole sequence) and `attend_len`, like difflm's
Transformer. `_SlotCache` hands it to Qwen3's attention in place of an HF cache object: each layer's
`update` writes the new rotated keys/values at slots [offset, offset+Q) and reads back [0, attend_len),
so the sampler can overwrite the block's slots in the middle of the sequence (HF caches only append).

Importing this module registers `qwen3_llada` with `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM`,
so `from_pretrained` needs no `trust_remote_code`. Only "eager" and "sdpa" attention are supported: the
flash / flex kernels cannot take an arbitrary additive bias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3PreTrainedModel

from difflm.errors import DifflmError
from difflm.models.layers import KVCache


@strict
class Qwen3LLaDAConfig(Qwen3Config):
    """`Qwen3Config` plus the mask token; no KV cache (a denoiser re-reads the whole sequence)."""

    model_type = "qwen3_llada"

    use_cache: bool = False
    mask_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if "sliding_attention" in self.layer_types:
            raise DifflmError(
                "Qwen3-LLaDA does not support sliding-window layers; set use_sliding_window=false in the config"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise DifflmError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size}); "
                "resize the embedding or fix mask_token_id"
            )


def combine_bias(
    attention_bias: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    queries: int | None = None,
) -> torch.Tensor | None:
    """Merge an additive bias [B|1, 1, Q|1, K] and a padding mask [B, K] into one additive mask.

    `length` is the key count K; `queries` the query count Q (default K; fewer with a KV cache).

    The result broadcasts to [B, 1, Q, K] (padding alone stays [B, 1, 1, K], no L x L tensor).
    -inf becomes the dtype's minimum so a query that sees no key at all (e.g. a padded query under
    block attention) gets a uniform softmax instead of NaN. Returns None for full attention.
    """
    parts = []
    queries = length if queries is None else queries
    if attention_bias is not None:
        if (
            attention_bias.dim() != 4
            or attention_bias.shape[-1] != length
            or attention_bias.shape[-2] not in (1, queries)
        ):
            raise DifflmError(
                f"attention_bias has shape {tuple(attention_bias.shape)}, expected [B, 1, {queries} or 1, {length}]"
            )
        parts.append(attention_bias.to(device, torch.float32))  # [B, 1, Q, K]
    if attention_mask is not None:
        if attention_mask.shape != (batch, length):
            raise DifflmError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected [B, L] = [{batch}, {length}]"
            )
        hidden = ~attention_mask.to(device).bool()[:, None, None, :]  # [B, 1, 1, K]
        parts.append(torch.zeros(hidden.shape, device=device).masked_fill(hidden, float("-inf")))
    if not parts:
        return None
    bias = parts[0] if len(parts) == 1 else parts[0] + parts[1]  # [B, 1, Q | 1, K]
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)


class _SlotCache:
    """Duck-types the one method of an HF cache that Qwen3's attention calls, over a difflm KVCache."""

    def __init__(self, cache: KVCache, start: int, attend_len: int) -> None:
        self.cache, self.start, self.attend_len = cache, start, attend_len

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(layer_idx, self.start, k, v, self.attend_len)  # [B, H_kv, K, D] each


class Qwen3LLaDAPreTrainedModel(Qwen3PreTrainedModel):
    config_class = Qwen3LLaDAConfig
    _supports_flash_attn = False
    _supports_flex_attn = False


class Qwen3LLaDAModel(Qwen3LLaDAPreTrainedModel, Qwen3Model):
    """Qwen3's decoder stack with bidirectional attention and an optional additive bias."""

    def __init__(self, config: Qwen3LLaDAConfig):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        **kwargs,
    ):
        """With `kv_cache`, the Q inputs sit at positions position_offset..+Q, their keys/values are
        written there and attention runs over slots [0, attend_len) (default offset + Q); the bias
        and padding mask then cover attend_len keys."""
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)  # [B, Q, D]
        batch, queries = embeds.shape[:2]
        slots = None
        if kv_cache is not None:
            attend_len = position_offset + queries if attend_len is None else attend_len
            kv_cache.check(batch, position_offset, queries, attend_len)
            slots = _SlotCache(kv_cache, position_offset, attend_len)
        elif attend_len is not None or position_offset:
            raise DifflmError(
                "position_offset / attend_len need a kv_cache (see difflm.models.layers.KVCache)"
            )
        if position_ids is None and slots is not None:
            position_ids = torch.arange(queries, device=embeds.device)[None] + position_offset  # [1, Q]
        keys = queries if slots is None else attend_len
        mask = combine_bias(attention_bias, attention_mask, batch, keys, embeds.dtype, embeds.device, queries)
        mask_mapping = dict.fromkeys(set(self.config.layer_types), mask)
        return super().forward(
            inputs_embeds=embeds,
            attention_mask=mask_mapping,
            position_ids=position_ids,
            past_key_values=slots,
            use_cache=False,
            **kwargs,
        )


class Qwen3LLaDAForMaskedLM(Qwen3LLaDAPreTrainedModel):
    """Qwen3-LLaDA with the (possibly tied) LM head; keys equal `Qwen3ForCausalLM`'s."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3LLaDAConfig):
        super().__init__(config)
        self.model = Qwen3LLaDAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        **kwargs,
    ) -> MaskedLMOutput:
        """Logits for every position. `t` and `cond` belong to the denoiser protocol and are unused:
        LLaDA is time-agnostic (the mask tokens carry the noise level) and unconditional."""
        kwargs.pop("return_dict", None)
        out = self.model(
            input_ids=input_ids, attention_bias=attention_bias, attention_mask=attention_mask, **kwargs
        )
        logits = self.lm_head(out.last_hidden_state)  # [B, L, V]
        return MaskedLMOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class Qwen3LLaDADenoiser(nn.Module):
    """Adapter to the difflm denoiser protocol: `forward` returns the logits tensor [B, L, V].

    It registers the HF model's two children (`model`, `lm_head`) as its own and keeps the HF
    wrapper as a plain attribute (`.hf`), so its `state_dict` keys are exactly the HF ones: a difflm
    checkpoint's `model.safetensors` plus `config.json` (written from `.config`) is a folder that
    `AutoModelForMaskedLM.from_pretrained` loads as is.
    """

    def __init__(self, model: Qwen3LLaDAForMaskedLM):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        object.__setattr__(self, "hf", model)  # not a submodule: no "hf." prefix in state_dict
        self.config = model.config
        self.mask_token_id = model.mask_token_id

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, Q, V], or packed [N, V] at the true positions of `logits_at` [B, Q]."""
        hidden = self.model(
            input_ids=input_ids,
            attention_bias=attention_bias,
            attention_mask=attention_mask,
            position_offset=position_offset,
            kv_cache=kv_cache,
            attend_len=attend_len,
        ).last_hidden_state  # [B, Q, D]
        return self.lm_head(hidden if logits_at is None else hidden[logits_at.bool()])

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of max_len slots per layer (default: every position) for this model
        (GQA: key/value heads only)."""
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


def as_denoiser(model: Qwen3LLaDAForMaskedLM) -> Qwen3LLaDADenoiser:
    """Wrap an HF Qwen3-LLaDA model so that calling it returns logits; save with `.hf.save_pretrained`."""
    return Qwen3LLaDADenoiser(model)


# ----------------------------------------------------------------------------- difflm model family


ATTENTION_KINDS = ("sdpa", "eager")


@dataclass
class Qwen3LLaDASpec:
    """The `model:` section of family `qwen3_llada`: a Qwen3 architecture built from these fields.

    `vocab_size` and `mask_token_id` are derived from the tokenizer by the system. With
    `init_from`, the system copies the architecture fields from that folder's config.json and its
    weights, so the run config stored in every checkpoint rebuilds the model without `init_from`.
    """

    vocab_size: int = field(default=1, metadata={"help": "embedding rows (derived from the tokenizer)"})
    mask_token_id: int | None = field(
        default=None, metadata={"help": "mask token id (derived from the tokenizer)"}
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "a Qwen3-LLaDA folder to start from: a `difflm convert` output or a difflm step folder "
            "(an HF Qwen3 checkpoint must be converted first); overrides the architecture fields"
        },
    )
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    intermediate_size: int = field(default=768, metadata={"help": "SwiGLU MLP hidden width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    num_key_value_heads: int = field(
        default=2, metadata={"help": "key/value heads (GQA); divides the query heads"}
    )
    head_dim: int = field(default=64, metadata={"help": "width of one attention head"})
    rope_theta: float = field(default=1_000_000.0, metadata={"help": "RoPE base frequency"})
    max_position_embeddings: int = field(
        default=2048, metadata={"help": "longest sequence (prompt + answer)"}
    )
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "share the LM head with the embedding"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel (must take an additive bias): sdpa or eager"}
    )

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
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise DifflmError(
            f"RoPE type {rope.get('rope_type')!r} is not supported by model.family=qwen3_llada; use a default-RoPE checkpoint"
        )
    values = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS if name != "rope_theta"}
    values["rope_theta"] = float(rope.get("rope_theta", spec.rope_theta))
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
        path, dtype=torch.float32, attn_implementation=spec.attn_implementation
    )
    return as_denoiser(model), spec_from_hf(model.config, spec)


AutoConfig.register(Qwen3LLaDAConfig.model_type, Qwen3LLaDAConfig, exist_ok=True)
AutoModel.register(Qwen3LLaDAConfig, Qwen3LLaDAModel, exist_ok=True)
AutoModelForMaskedLM.register(Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM, exist_ok=True)
