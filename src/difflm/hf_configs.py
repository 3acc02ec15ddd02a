"""Hugging Face config classes of difflm's HF-format model families, kept apart from the models.

This module imports nothing but transformers' `PretrainedConfig` (no model code), so `import difflm`
can register these classes with `AutoConfig` the moment transformers' Auto machinery is loaded
(`difflm.auto`) without importing any model. Each class keeps the field names of the checkpoints
it reads, so their config.json files load unchanged.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from difflm.errors import DifflmError


def rope_theta_of(rope_theta: float, rope_scaling: dict | None, rope_parameters: dict | None) -> float:
    """The RoPE base from either way a Qwen3 config.json spells it (`rope_theta` + `rope_scaling`,
    or transformers 5's `rope_parameters`); scaled RoPE kinds are refused."""
    rope = rope_parameters or rope_scaling or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise DifflmError(
            f"RoPE type {kind!r} is not supported by Qwen3-LLaDA; use a checkpoint with default RoPE "
            "(rope_scaling: null)"
        )
    return float(rope.get("rope_theta", rope_theta))


class Qwen3LLaDAConfig(PretrainedConfig):
    """Qwen3's architecture fields, with `transformers.Qwen3Config`'s names and defaults, plus the
    mask token. A Qwen3 config.json (either transformers generation) loads into it unchanged;
    sliding-window attention and non-silu activations are refused."""

    model_type = "qwen3_llada"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mask_token_id: int | None = None,
        use_cache: bool = False,
        **kwargs,
    ):
        rope_theta = rope_theta_of(
            rope_theta, kwargs.pop("rope_scaling", None), kwargs.pop("rope_parameters", None)
        )
        layer_types = kwargs.pop("layer_types", None) or []
        if kwargs.pop("use_sliding_window", False) or "sliding_attention" in layer_types:
            raise DifflmError(
                "Qwen3-LLaDA does not support sliding-window layers; set use_sliding_window=false in the config"
            )
        for unused in ("sliding_window", "max_window_layers"):  # meaningful only with a sliding window
            kwargs.pop(unused, None)
        if hidden_act != "silu":
            raise DifflmError(
                f"Qwen3-LLaDA's MLP is SwiGLU (hidden_act 'silu'); this config has {hidden_act!r}"
            )
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.rope_theta = (
            initializer_range,
            rms_norm_eps,
            rope_theta,
        )
        self.attention_bias, self.attention_dropout = attention_bias, attention_dropout
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        if mask_token_id is not None and not 0 <= mask_token_id < vocab_size:
            raise DifflmError(
                f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size}); "
                "resize the embedding or fix mask_token_id"
            )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
