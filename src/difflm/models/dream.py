"""Dream-v0 (`model_type: Dream`, e.g. Dream-v0-Instruct-7B) run natively, with no trust_remote_code.

Dream is Qwen2 trained as a masked-diffusion LM: difflm's decoder blocks (`models/decoder.py`) with
biases on the q/k/v projections (none on o_proj), no q/k-norm, bidirectional attention, an untied
LM head and the published key names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj.bias`,
..., `lm_head`). Its one peculiarity is the logits shift of its generation code: the prediction
for position i is read from position i-1's output (`logits = cat(logits[:, :1], logits[:, :-1])`).
`DreamForMaskedLM` applies the shift inside its forward, so `.logits[:, i]` predicts token i as for
every other difflm denoiser, and the one engine runs it unchanged (with the KV caches it feeds one
extra position in front of the block, so the shift stays exact; Fast-dLLM instead decodes each
block's first token in the refresh pass). The mask token (151666) comes from the config.
"""

from __future__ import annotations

from difflm.hf_configs import DreamConfig
from difflm.models.decoder import DecoderLayer
from difflm.models.qwen3_llada import Qwen3LLaDAForMaskedLM, Qwen3LLaDAModel

__all__ = ["DreamConfig", "DreamBaseModel", "DreamForMaskedLM"]


class DreamBaseModel(Qwen3LLaDAModel):
    """Dream's decoder stack (published class name `DreamBaseModel`)."""

    config_class = DreamConfig

    @staticmethod
    def new_layer(c: DreamConfig) -> DecoderLayer:
        return DecoderLayer(
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            eps=c.rms_norm_eps,
            qk_norm=False,
            qkv_bias=True,
            out_bias=False,
            dropout=c.attention_dropout,
        )


class DreamForMaskedLM(Qwen3LLaDAForMaskedLM):
    """Dream with its LM head (published as `DreamModel`); `.logits` are already shifted."""

    config_class = DreamConfig
    base_model_class = DreamBaseModel
    logits_shift = 1
