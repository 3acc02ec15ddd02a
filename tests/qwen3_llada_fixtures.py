"""Tiny offline fixtures shared by the Qwen3-LLaDA system tests: a word-level HF tokenizer with
BOS/EOS/PAD/MASK, a word corpus, conversation records and run-config overrides."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"]
WORDS = [f"w{i}" for i in range(40)]

TINY_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.head_dim=8",
    "model.max_position_embeddings=64",
    "model.attn_implementation=eager",
]
TINY_TRAIN = [
    "data.block_size=16",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.lr=0.003",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.progress=false",
    "train.device=cpu",
    "train.save_every=3",
    "train.keep_last=0",
]


def save_tokenizer(folder: Path) -> Path:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_words: int = 1500) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS[:20]) for _ in range(n_words)) + "\n", encoding="utf-8")
    return path


def write_conversations(path: Path, n: int = 24) -> Path:
    """'w1 wK' -> 'wK wK+1': a copy-and-shift task with prompts of 2-3 tokens."""
    rng = random.Random(1)
    lines = []
    for i in range(n):
        k = rng.randrange(2, 30)
        record = {
            "conversations": [
                {"from": "human", "value": f"w1 w{k}"},
                {"from": "gpt", "value": f"w{k} w{k + 1}"},
            ]
        }
        if i % 3 == 0:
            record["system"] = "w0"
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pretrain_overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        save_tokenizer(tokenizer)
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return [
        "task=qwen3_llada_pretrain",
        "model.family=qwen3_llada",
        *TINY_MODEL,
        *TINY_TRAIN,
        f"data.path={corpus}",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / out}",
        *extra,
    ]


def sft_overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        save_tokenizer(tokenizer)
    chats = tmp_path / "chats.jsonl"
    if not chats.exists():
        write_conversations(chats)
    return [
        "task=qwen3_llada_sft",
        "model.family=qwen3_llada",
        *TINY_MODEL,
        *TINY_TRAIN,
        "data.block_size=8",
        "data.val_fraction=0.2",
        "diffusion.loss=sft",
        f"data.path={chats}",
        f"data.tokenizer={tokenizer}",
        f"train.output_dir={tmp_path / out}",
        *extra,
    ]
