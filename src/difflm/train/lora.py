"""LoRA adapters for fine-tuning large models (optional extra `lora`: peft), `train.lora.r > 0`.

`add_adapters` injects peft's LoRA layers into the model in place (the module keeps its class and
the denoiser protocol) and freezes everything else, so the optimizer holds only the adapters. A
checkpoint stores the whole model (base weights under peft's `base_layer` names) plus the
adapters alone in `adapter_model.safetensors` / `adapter_config.json` (peft's layout, small enough
to ship on their own). `load_pretrained` rebuilds such a checkpoint and `merge`s the adapters into
the base weights, so sample, eval and serve get a plain model with the family's own key names.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from difflm.config import LoraConfig
from difflm.errors import DifflmError

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
DEFAULT_TARGETS = {
    "qwen3_llada": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "transformer": ["attn.qkv", "attn.out_proj"],
}


def _peft():
    try:
        import peft
    except ImportError:
        raise DifflmError("train.lora needs peft: pip install 'difflm[lora]'") from None
    return peft


def peft_config(cfg: LoraConfig, family: str):
    targets = list(cfg.target_modules) or DEFAULT_TARGETS.get(family)
    if not targets:
        raise DifflmError(
            f"no default LoRA targets for model family '{family}': set train.lora.target_modules"
        )
    return _peft().LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)


def add_adapters(model: nn.Module, cfg: LoraConfig, family: str) -> nn.Module:
    """Inject LoRA layers (in place) and freeze every other parameter."""
    try:
        return _peft().inject_adapter_in_model(peft_config(cfg, family), model)
    except ValueError as err:  # peft: no module matched the targets
        raise DifflmError(f"train.lora.target_modules matched no layer of the model: {err}") from None


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def write_adapters(model: nn.Module, cfg: LoraConfig, family: str, folder: Path) -> list[Path]:
    """Write the adapters alone in peft's layout; returns the two files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _peft().get_peft_model_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_FILE))
    config = peft_config(cfg, family).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    return [folder / ADAPTER_FILE, folder / ADAPTER_CONFIG_FILE]


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer()
            )
    return model
