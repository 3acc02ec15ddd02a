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
difflm denoiser protocol (a module returning the logits tensor) wraps the model with `as_denoiser(model)`.

Importing this module registers `qwen3_llada` with `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM`,
so `from_pretrained` needs no `trust_remote_code`. Only "eager" and "sdpa" attention are supported: the
flash / flex kernels cannot take an arbitrary additive bias.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3PreTrainedModel

from difflm.errors import DifflmError


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
) -> torch.Tensor | None:
    """Merge an additive bias [B|1, 1, Q, K] and a padding mask [B, K] into one additive mask.

    The result broadcasts to [B, 1, Q, K] (padding alone stays [B, 1, 1, K], no L x L tensor).
    -inf becomes the dtype's minimum so a query that sees no key at all (e.g. a padded query under
    block attention) gets a uniform softmax instead of NaN. Returns None for full attention.
    """
    parts = []
    if attention_bias is not None:
        if attention_bias.dim() != 4 or attention_bias.shape[-2:] != (length, length):
            raise DifflmError(
                f"attention_bias has shape {tuple(attention_bias.shape)}, expected [B, 1, {length}, {length}]"
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
        **kwargs,
    ):
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)  # [B, L, D]
        batch, length = embeds.shape[:2]
        mask = combine_bias(attention_bias, attention_mask, batch, length, embeds.dtype, embeds.device)
        mask_mapping = dict.fromkeys(set(self.config.layer_types), mask)
        return super().forward(
            inputs_embeds=embeds,
            attention_mask=mask_mapping,
            position_ids=position_ids,
            past_key_values=None,
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
    """Adapter to the difflm denoiser protocol: `forward` returns the logits tensor [B, L, V]."""

    def __init__(self, model: Qwen3LLaDAForMaskedLM):
        super().__init__()
        self.model = model
        self.mask_token_id = model.mask_token_id

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, attention_bias=attention_bias, attention_mask=attention_mask).logits


def as_denoiser(model: Qwen3LLaDAForMaskedLM) -> Qwen3LLaDADenoiser:
    """Wrap an HF Qwen3-LLaDA model so that calling it returns logits; save with `.model.save_pretrained`."""
    return Qwen3LLaDADenoiser(model)


AutoConfig.register(Qwen3LLaDAConfig.model_type, Qwen3LLaDAConfig, exist_ok=True)
AutoModel.register(Qwen3LLaDAConfig, Qwen3LLaDAModel, exist_ok=True)
AutoModelForMaskedLM.register(Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM, exist_ok=True)
