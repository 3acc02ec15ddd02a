"""Model families, registered in one explicit table: family name -> (config dataclass, builder).

Fields a family derives from the data (vocabulary size, sequence length, special-token ids) are
listed in `DERIVED`: recipes leave them out and the system fills them in from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from difflm.models.dfgpt import DFGPT, DFGPTConfig
from difflm.models.mlm import MLMConfig, build_mlm
from difflm.models.qwen3 import Qwen3Spec, build_qwen3
from difflm.models.qwen3_llada import Qwen3LLaDASpec, build_qwen3_llada
from difflm.models.sgdd import SGDD, SGDDConfig
from difflm.models.size import check_fits
from difflm.models.transformer import Transformer, TransformerConfig

MODEL_CONFIGS: dict[str, type] = {
    "transformer": TransformerConfig,
    "sgdd": SGDDConfig,
    "qwen3_llada": Qwen3LLaDASpec,
    "qwen3": Qwen3Spec,
    "mlm": MLMConfig,
    "dfgpt": DFGPTConfig,
}

BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "transformer": Transformer,
    "sgdd": SGDD,
    "qwen3_llada": build_qwen3_llada,
    "qwen3": build_qwen3,
    "mlm": build_mlm,
    "dfgpt": DFGPT,
}

DERIVED: dict[str, dict[str, Any]] = {
    "transformer": {"vocab_size": 1, "block_size": 2, "mask_token_id": None, "pad_token_id": None},
    "qwen3_llada": {"vocab_size": 1, "mask_token_id": None},
    "qwen3": {"vocab_size": 1, "mask_token_id": None},
    "dfgpt": {"vocab_size": 1, "block_size": 2},
}


def build_model(family: str, cfg: Any) -> nn.Module:
    """A fresh model of `family`; a config too large for the memory available is refused first."""
    check_fits(family, cfg)
    return BUILDERS[family](cfg)
