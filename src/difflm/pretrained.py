"""Load a trained checkpoint folder: the model, its tokenizer and the run config it was trained with.

A checkpoint describes itself (`difflm.json`), so `sample` and `eval` need only a path. Loading is
checked end to end: every file against its sha256 in the manifest (`verify=False` checks sizes
only), the run config through the same validation as the command line, the model's size before it
is allocated, every weight by name and shape, and the tokenizer against the model's vocabulary.
Nothing in a checkpoint reaches the network: Hugging Face loads run with HF_HUB_OFFLINE semantics.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflm.config import RunConfig, model_family, saved_config_from_dict
from difflm.data.tokenizers import Tokenizer, load_tokenizer
from difflm.errors import DifflmError
from difflm.models import build_model
from difflm.train import checkpoint as ckpt
from difflm.train import lora


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: Tokenizer
    config: RunConfig
    path: Path


def load_pretrained(where: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Pretrained:
    """`where`: a step folder, a run folder (its latest checkpoint is used), `RUN/checkpoints/best`,
    or an HF snapshot of a published diffusion LM (LLaDA, Dream, a converted Qwen3-LLaDA:
    `difflm.snapshots`). A run that kept an EMA of its weights loads the average (ema.safetensors)."""
    from difflm import snapshots

    if snapshots.is_snapshot(Path(where)):
        with offline_hub():
            return Pretrained(*snapshots.load_snapshot(Path(where), device), Path(where))
    path = ckpt.resolve_checkpoint(where, verify=verify)
    cfg = saved_config_from_dict(ckpt.read_json(path / ckpt.RUN_CONFIG_FILE))
    with offline_hub():
        model = build_model(model_family(cfg.model), cfg.model)
        if cfg.train.lora.r:  # trained with LoRA: load base + adapters, then merge them into the weights
            model = lora.add_adapters(model, cfg.train.lora, model_family(cfg.model))
        ckpt.load_weights(model, path, ckpt.inference_file(path))
        if cfg.train.lora.r:
            model = lora.merge(model)
        tokenizer = load_tokenizer(path)
    check_tokenizer(tokenizer, model, cfg, path)
    model.to(device).eval()
    return Pretrained(model, tokenizer, cfg, path)


def check_tokenizer(tokenizer: Tokenizer, model: nn.Module, cfg: RunConfig, path: Path) -> None:
    """The tokenizer must produce only ids the model has, and agree on the mask token."""
    vocab = model_vocab(cfg.model)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise DifflmError(
            f"the tokenizer in '{path}' has {tokenizer.vocab_size} tokens, more than the model's {vocab}: "
            "it is not the tokenizer this model was trained with"
        )
    mask = getattr(model, "mask_token_id", None)
    if mask is not None and tokenizer.mask_token_id != mask:
        raise DifflmError(
            f"the tokenizer in '{path}' has mask id {tokenizer.mask_token_id}, the model {mask}: "
            "it is not the tokenizer this model was trained with"
        )


def model_vocab(model_cfg: Any) -> int | None:
    vocab = getattr(model_cfg, "vocab_size", None)
    if vocab is None:
        vocab = (getattr(model_cfg, "hf_config", None) or {}).get("vocab_size")
    return vocab if isinstance(vocab, int) else None


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE for the duration: a hub name inside a checkpoint fails at once, locally."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    _set_hub_constant(True)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
        _set_hub_constant(_offline_from_env())


def _offline_from_env() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _set_hub_constant(value: bool) -> None:
    """huggingface_hub reads the variable once, at import; its module constant is what it checks."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = value
