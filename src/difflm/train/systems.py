"""Systems: recipe -> (model, task, data, tokenizer), one builder per `task` name in `SYSTEMS`.

A builder reads the run config, prepares the data, fills the model fields derived from it
(vocabulary size, block size, special-token ids) and returns a `Run` for the one trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from difflm.config import DataConfig, RunConfig, model_family
from difflm.data.corpora import resolve_corpus
from difflm.data.packing import (
    TokenBlocks,
    fingerprint_source,
    pack_to_file,
    packed_is_current,
    read_packed_meta,
    split_ranges,
)
from difflm.data.sources import iter_texts
from difflm.data.tokenizers import Tokenizer, build_tokenizer
from difflm.errors import DifflmError
from difflm.models import build_model
from difflm.systems.forcing import build_forcing
from difflm.systems.prefix_diffusion import build_poems_ar, build_prefix_diffusion
from difflm.systems.qwen3_llada import build_pretrain as build_qwen3_llada_pretrain
from difflm.systems.qwen3_llada import build_sft as build_qwen3_llada_sft
from difflm.systems.sgdd import build_sgdd
from difflm.train.tasks import AutoregressiveTask, MaskedDiffusionTask
from difflm.train.trainer import Run


def text_blocks(
    cfg: DataConfig, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, TokenBlocks, TokenBlocks]:
    """Tokenize a corpus once into a cached token file; return (tokenizer, train blocks, val blocks)."""
    path = str(resolve_corpus(cfg.path))

    def texts():
        return iter_texts(path, format=cfg.format, field=cfg.field, split=cfg.split)

    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer, texts() if cfg.tokenizer == "char" else None)
    source = fingerprint_source(path, format=cfg.format, field=cfg.field, split=cfg.split)
    packed = Path(cfg.cache_dir) / f"tokens-{source}-{tokenizer.fingerprint()}.bin"
    if not packed_is_current(packed, tokenizer, source, cfg.append_eos):
        pack_to_file(texts(), tokenizer, packed, append_eos=cfg.append_eos, source_fingerprint=source)
    n_tokens = read_packed_meta(packed)["n_tokens"]
    (train_start, train_end), (val_start, val_end) = split_ranges(n_tokens, cfg.val_fraction)
    for name, (start, end) in (("train", (train_start, train_end)), ("val", (val_start, val_end))):
        if end - start < cfg.block_size:
            raise DifflmError(
                f"data.block_size {cfg.block_size} is larger than the {name} split ({end - start} tokens of "
                f"{n_tokens}): lower data.block_size or use more data"
            )
    train = TokenBlocks(packed, cfg.block_size, train_start, train_end)
    val = TokenBlocks(packed, cfg.block_size, val_start, val_end)
    return tokenizer, train, val


def fill_derived(cfg: RunConfig, tokenizer: Tokenizer, *, causal: bool | None = None) -> None:
    """Set the model fields that come from the tokenizer and data (in place, revalidated)."""
    updates = {
        "vocab_size": tokenizer.vocab_size,
        "block_size": cfg.data.block_size,
        "mask_token_id": tokenizer.mask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if causal is not None:
        updates["causal"] = causal
    cfg.model = dataclasses.replace(cfg.model, **updates)


def _require_family(cfg: RunConfig, family: str) -> None:
    if model_family(cfg.model) != family:
        raise DifflmError(f"task '{cfg.task}' trains model.family={family}, got {model_family(cfg.model)}")


def build_masked_diffusion(cfg: RunConfig) -> Run:
    _require_family(cfg, "transformer")
    tokenizer, train, val = text_blocks(cfg.data)
    fill_derived(cfg, tokenizer, causal=False)
    task = MaskedDiffusionTask(
        cfg.diffusion, mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size
    )
    return Run(build_model("transformer", cfg.model), task, train, val, tokenizer)


def build_autoregressive(cfg: RunConfig) -> Run:
    _require_family(cfg, "transformer")
    tokenizer, train, val = text_blocks(cfg.data)
    fill_derived(cfg, tokenizer, causal=True)
    return Run(build_model("transformer", cfg.model), AutoregressiveTask(), train, val, tokenizer)


SYSTEMS: dict[str, Callable[[RunConfig], Run]] = {
    "masked_diffusion": build_masked_diffusion,
    "autoregressive": build_autoregressive,
    "sgdd": build_sgdd,
    "prefix_diffusion": build_prefix_diffusion,
    "poems_ar": build_poems_ar,
    "teacher_forcing": build_forcing,
    "diffusion_forcing": build_forcing,
    "qwen3_llada_pretrain": build_qwen3_llada_pretrain,
    "qwen3_llada_sft": build_qwen3_llada_sft,
}


def build_run(cfg: RunConfig) -> Run:
    """Build the system named by `cfg.task`; model init is seeded by `train.seed`."""
    if cfg.task not in SYSTEMS:
        raise DifflmError(f"config key 'task' is {cfg.task!r}; valid choices: {', '.join(SYSTEMS)}")
    torch.manual_seed(cfg.train.seed)
    return SYSTEMS[cfg.task](cfg)
