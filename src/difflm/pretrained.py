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


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: Tokenizer
    config: RunConfig
    path: Path


def load_pretrained(where: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """`where`: a step folder, a run folder (its latest checkpoint is used), or an HF snapshot of a
    published diffusion LM (LLaDA, Dream, a converted Qwen3-LLaDA: `difflm.snapshots`)."""
    from difflm import snapshots

    if snapshots.is_snapshot(Path(where)):
        return snapshots.load_snapshot(Path(where), device)
    path = ckpt.resolve_checkpoint(where)
    cfg = config_from_dict(ckpt.read_json(path / ckpt.RUN_CONFIG_FILE))
    model = build_model(model_family(cfg.model), cfg.model)
    ckpt.load_weights(model, path)
    model.to(device).eval()
    return Pretrained(model, load_tokenizer(path), cfg, path)
