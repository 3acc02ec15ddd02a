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
            f"RoPE type {kind!r} is not supported by difflm's decoder; use a checkpoint with default RoPE "
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
                f"{self.model_type} in difflm has no sliding-window layers; set use_sliding_window=false in the config"
            )
        for unused in ("sliding_window", "max_window_layers"):  # meaningful only with a sliding window
            kwargs.pop(unused, None)
        if hidden_act != "silu":
            raise DifflmError(
                f"{self.model_type}'s MLP is SwiGLU (hidden_act 'silu'); this config has {hidden_act!r}"
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


class DreamConfig(Qwen3LLaDAConfig):
    """Dream-v0 (`model_type: Dream`): the Qwen2 fields of its published config.json, with its
    defaults (mask token 151666, pad 151643, head_dim = hidden_size / heads). The architecture
    differs from Qwen3 in fixed ways (q/k/v biases, no q/k-norm), not through these fields."""

    model_type = "Dream"

    def __init__(self, mask_token_id: int | None = 151666, pad_token_id: int | None = 151643, **kwargs):
        kwargs.setdefault("head_dim", None)
        super().__init__(mask_token_id=mask_token_id, pad_token_id=pad_token_id, **kwargs)


# LLaDA's published config.json is OLMo's ModelConfig; these are the only values difflm implements.
LLADA_FIXED = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


class LLaDAConfig(PretrainedConfig):
    """LLaDA-8B / LLaDA-1.5 (`model_type: llada`), field names as in its published config.json;
    defaults are LLaDA-8B's. Fields outside `LLADA_FIXED`'s values are refused in one line."""

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        input_emb_norm: bool = False,
        scale_logits: bool = False,
        attention_dropout: float = 0.0,
        init_std: float = 0.02,
        mask_token_id: int | None = 126336,
        use_cache: bool = False,
        **kwargs,
    ):
        for key, value in LLADA_FIXED.items():
            if kwargs.setdefault(key, value) != value:
                raise DifflmError(
                    f"LLaDA with {key}={kwargs[key]!r} is not supported; difflm implements {key}={value!r}"
                )
        if kwargs.get("multi_query_attention"):
            n_kv_heads = 1
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.mlp_ratio, self.mlp_hidden_size = mlp_ratio, mlp_hidden_size
        self.vocab_size, self.embedding_size, self.max_sequence_length = (
            vocab_size,
            embedding_size,
            max_sequence_length,
        )
        self.rope_theta, self.rms_norm_eps, self.weight_tying = rope_theta, rms_norm_eps, weight_tying
        self.include_bias, self.include_qkv_bias = include_bias, include_qkv_bias
        self.input_emb_norm, self.scale_logits = input_emb_norm, scale_logits
        self.attention_dropout, self.init_std = attention_dropout, init_std
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        if d_model % n_heads or n_heads % self.n_kv_heads:
            raise DifflmError(
                f"LLaDA needs n_heads | d_model and n_kv_heads | n_heads; got {d_model}, {n_heads}, {self.n_kv_heads}"
            )
        kwargs.setdefault("tie_word_embeddings", False)  # LLaDA ties through `weight_tying` (no lm_head)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rows(self) -> int:
        """Embedding rows = logits width (`embedding_size`, padded past `vocab_size`)."""
        return self.embedding_size or self.vocab_size
