"""Load a trained checkpoint folder: the model, its tokenizer and the run config it was trained with.

A checkpoint describes itself (`difflm.json`), so `sample` and `eval` need only a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difflm.config import RunConfig, config_from_dict, model_family
from difflm.data.tokenizers import Tokenizer, load_tokenizer
from difflm.models import build_model
from difflm.train import checkpoint as ckpt
from difflm.train import lora


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: Tokenizer
    config: RunConfig
    path: Path


def load_pretrained(where: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """`where`: a step folder, or a run folder (its latest checkpoint is used)."""
    path = ckpt.resolve_checkpoint(where)
    cfg = config_from_dict(ckpt.read_json(path / ckpt.RUN_CONFIG_FILE))
    model = build_model(model_family(cfg.model), cfg.model)
    if cfg.train.lora.r:  # trained with LoRA: load base + adapters, then merge them into the weights
        model = lora.add_adapters(model, cfg.train.lora, model_family(cfg.model))
    ckpt.load_weights(model, path)
    if cfg.train.lora.r:
        model = lora.merge(model)
    model.to(device).eval()
    return Pretrained(model, load_tokenizer(path), cfg, path)
