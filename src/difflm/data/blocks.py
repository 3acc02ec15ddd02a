"""`text_blocks`: a corpus tokenized once into a cached token file, cut into train and val blocks.

Every system that trains on packed text (and every evaluator that scores its validation split)
reads its data through this one function, so the cache file and the split are the same for all.
`extra_train_blocks` packs `data.extra_train`'s training-only text the same way (`build_run` in
systems/registry.py appends it to the training split).
"""

from __future__ import annotations

from pathlib import Path

from difflm.config import DataConfig
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


def text_blocks(
    cfg: DataConfig, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, TokenBlocks, TokenBlocks]:
    """Tokenize a corpus once into a cached token file; return (tokenizer, train blocks, val blocks)."""
    path = str(resolve_corpus(cfg.path))
    if tokenizer is None:
        char = cfg.tokenizer == "char"  # a character vocabulary is read off the corpus itself
        texts = iter_texts(path, format=cfg.format, field=cfg.field, split=cfg.split) if char else None
        tokenizer = build_tokenizer(cfg.tokenizer, texts)
    packed = packed_file(path, cfg, tokenizer)
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


def extra_train_blocks(cfg: DataConfig, tokenizer: Tokenizer) -> list[TokenBlocks]:
    """The blocks of every `data.extra_train` source, all of its tokens (it has no validation part),
    packed with the corpus's own tokenizer and read the way `data.path` is read."""
    blocks = []
    for extra in cfg.extra_train:
        try:
            path = str(resolve_corpus(extra))
        except DifflmError as e:
            raise DifflmError(f"data.extra_train {extra}: {e}") from None
        try:
            packed = packed_file(path, cfg, tokenizer)
        except DifflmError as e:
            note = "the tokenizer is data.path's: the corpus must hold that text too"
            raise DifflmError(f"data.extra_train {extra}: {e} ({note})") from None
        n_tokens = read_packed_meta(packed)["n_tokens"]
        if n_tokens <= cfg.block_size:
            raise DifflmError(
                f"data.extra_train {extra} has {n_tokens} tokens, not one block of data.block_size "
                f"{cfg.block_size}: give more text or drop it"
            )
        blocks.append(TokenBlocks(packed, cfg.block_size))
    return blocks


def packed_file(path: str, cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    """The cached token file of `path` read with cfg's format, field and split; packed when missing
    or stale."""
    source = fingerprint_source(path, format=cfg.format, field=cfg.field, split=cfg.split)
    packed = Path(cfg.cache_dir) / f"tokens-{source}-{tokenizer.fingerprint()}.bin"
    if not packed_is_current(packed, tokenizer, source, cfg.append_eos):
        texts = iter_texts(path, format=cfg.format, field=cfg.field, split=cfg.split)
        pack_to_file(texts, tokenizer, packed, append_eos=cfg.append_eos, source_fingerprint=source)
    return packed
