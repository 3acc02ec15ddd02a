"""Tiny checkpoints for the server tests: our transformer with a char tokenizer, saved as a step folder."""

from __future__ import annotations

from pathlib import Path

import torch

from difflm.config import RunConfig, to_dict
from difflm.data.tokenizers import CharTokenizer
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.train.checkpoint import save_checkpoint

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"


def tiny_checkpoint(
    out: Path, causal: bool = False, seed: int = 0, block_size: int = 48, sharpen: float = 40.0
) -> Path:
    """A random 2-layer model (sharpened embeddings, so confidences spread out) saved under `out`."""
    tok = CharTokenizer(ALPHABET)
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=tok.vocab_size,
        block_size=block_size,
        n_layer=2,
        n_head=2,
        n_embd=32,
        causal=causal,
        mask_token_id=None if causal else tok.mask_token_id,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(sharpen)
    run = RunConfig(task="autoregressive" if causal else "masked_diffusion", model=cfg)
    return save_checkpoint(
        out, 1, model=model, run_config=to_dict(run), trainer_state={"step": 1}, tokenizer=tok
    )
