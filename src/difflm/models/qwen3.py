"""Family `qwen3`: transformers' own `Qwen3ForCausalLM`, the autoregressive model a Qwen3-LLaDA is
converted from.

It takes the same `model:` fields as `qwen3_llada` (`Qwen3Spec`) and is trained by the
`qwen3_ar_pretrain` system, so converting an AR model into a diffusion model can be measured end
to end on a CPU: `difflm convert --from qwen3` reads a checkpoint of this family like a Hugging Face
Qwen3 folder. Only transformers' public classes are used; the logits come back as a plain tensor
through `.logits`, as from any HF model.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Qwen3Config, Qwen3ForCausalLM

from difflm.errors import DifflmError
from difflm.models.qwen3_llada import Qwen3LLaDASpec


@dataclass
class Qwen3Spec(Qwen3LLaDASpec):
    """The `model:` section of family `qwen3`: the architecture fields of `qwen3_llada`
    (`mask_token_id` is kept for the tokenizer the converted model will need; `init_from` is refused)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from:
            raise DifflmError(
                "model.init_from is not supported by model.family=qwen3; it trains a causal Qwen3 from scratch"
            )

    def causal_config(self) -> Qwen3Config:
        """transformers' Qwen3 config of this architecture."""
        fields = self.hf_config().to_dict()
        fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "mask_token_id")}
        return Qwen3Config(**fields)


class Qwen3CausalLM(Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with difflm's `max_length` (the longest sequence it was built for)."""

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings


def build_qwen3(spec: Qwen3Spec) -> Qwen3CausalLM:
    """A freshly initialised causal Qwen3."""
    model = Qwen3CausalLM(spec.causal_config())
    model.config.architectures = ["Qwen3ForCausalLM"]  # what a saved folder is loaded as
    return model
