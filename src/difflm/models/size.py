"""How big a model config is, before anything is allocated: refuse one that cannot fit in memory.

A config read from a checkpoint or typed on the command line can ask for a billion layers; building
it would grow the process until the machine swaps. `check_fits` estimates the parameter count from
the few fields that drive it (layers, width, MLP width, vocabulary, positions) and refuses a model
whose float32 weights exceed the memory available now. The estimate counts a gated MLP and an
untied head, so it is never below the real count and at most about twice it (checked per family in
tests/test_checkpoint_safety.py): a guard against absurd sizes, not a memory budget.
"""

from __future__ import annotations

import os
from typing import Any

from difflm.errors import DifflmError

# family -> config field names of (layers, width, MLP width, vocabulary, positions); None: absent
SIZE_FIELDS: dict[str, tuple[str | None, ...]] = {
    "transformer": ("n_layer", "n_embd", "ffn_hidden", "vocab_size", "block_size"),
    "sgdd": ("n_layer", "n_embd", "ffn_hidden", "vocab_size", "block_size"),
    "dfgpt": ("n_layer", "n_embd", None, "vocab_size", "block_size"),
    "qwen3_llada": ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", None),
    "qwen3": ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", None),
    "mlm": ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings"),
}
BYTES_PER_PARAM = 4  # float32, as models are built


def _fields(family: str, cfg: Any) -> dict[str, Any]:
    if family == "mlm":
        return dict(getattr(cfg, "hf_config", None) or {})
    return vars(cfg)


def estimate_params(family: str, cfg: Any) -> int | None:
    """Approximate parameter count of `cfg`, or None when the family has no size fields."""
    names = SIZE_FIELDS.get(family)
    values = _fields(family, cfg)
    if names is None or values.get(names[0]) is None:
        return None

    def get(name: str | None, default: int = 0) -> int:
        value = values.get(name) if name else None
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    layers, width = get(names[0]), get(names[1])
    mlp = get(names[2], 4 * width) or 4 * width
    vocab, positions = get(names[3]), get(names[4])
    per_layer = 4 * width * width + 3 * width * mlp  # attention q, k, v, o + a (gated) MLP
    return layers * per_layer + 2 * vocab * width + positions * width


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_fits(family: str, cfg: Any, available: int | None = None) -> None:
    """Raise DifflmError when the float32 weights of `cfg` would not fit in the available memory."""
    params = estimate_params(family, cfg)
    available = available_memory() if available is None else available
    if params is None or available is None:
        return
    need = params * BYTES_PER_PARAM
    if need > available:
        raise DifflmError(
            f"this {family} model config has about {params:.3g} parameters ({_gb(need)} of float32 weights), "
            f"more than the {_gb(available)} of memory available: check the model section "
            f"({', '.join(n for n in SIZE_FIELDS[family] if n)})"
        )
