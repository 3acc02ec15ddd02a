"""Model families, registered in one explicit table: family name -> (config dataclass, builder).

Fields a family derives from the data (vocabulary size, sequence length, special-token ids) are
listed in `DERIVED`: recipes leave them out and the system fills them in from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from difflm.models.transformer import Transformer, TransformerConfig

MODEL_CONFIGS: dict[str, type] = {
    "transformer": TransformerConfig,
}

BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "transformer": Transformer,
}

DERIVED: dict[str, dict[str, Any]] = {
    "transformer": {"vocab_size": 1, "block_size": 2, "mask_token_id": None, "pad_token_id": None},
}


def build_model(family: str, cfg: Any) -> nn.Module:
    return BUILDERS[family](cfg)
