"""Training text from an AR teacher: its continuations of training prompts, greedy or sampled.

A masked or block diffusion model decoding greedily reveals a position once it is confident of it
(threshold decoding). Trained on real text it rarely is: the next characters of a text are
uncertain, so it reveals ~1 token a forward. Trained on what a greedy AR model writes, where every
continuation is a function of its prefix, it can learn to be sure of several tokens at once
(certainty distillation, as in dParallel; SDTT distils steps the same way). The student then
decodes like its teacher, in fewer forwards.

Prompts are non-overlapping windows of the teacher's own training split (never its validation
split); each example is `prompt_length + new_tokens` tokens, so training on them with
`data.block_size` of that size makes every block exactly one example.

Sampled at temperature 1 instead, the continuations are fresh text from the teacher's own
distribution (sequence-level distillation, Kim & Rush 2016): more training text for a student of
likelihood that has seen every real character many times. Each example draws from its own
generator, seeded by (seed, its index), so the file does not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from tqdm import tqdm

from difflm.data.blocks import text_blocks
from difflm.data.tokenizers import Tokenizer
from difflm.errors import DifflmError
from difflm.pretrained import Pretrained
from difflm.sampling.autoregressive import generate_ar


def teacher_examples(
    teacher: Pretrained,
    count: int,
    prompt_length: int,
    new_tokens: int,
    seed: int = 0,
    batch: int = 128,
    temperature: float = 0.0,
) -> Iterator[str]:
    """`count` texts, each a prompt of the teacher's training split and its continuation: greedy
    at temperature 0, else drawn at `temperature`."""
    if not teacher.config.model.causal:
        raise DifflmError("the teacher must be an autoregressive checkpoint (task autoregressive)")
    if min(count, prompt_length, new_tokens, batch) < 1:
        raise DifflmError("count, prompt length, new tokens and batch must all be >= 1")
    if temperature < 0:
        raise DifflmError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    data = dataclasses.replace(teacher.config.data, block_size=prompt_length)
    _, windows, _ = text_blocks(data, teacher.tokenizer)
    if count > len(windows):
        raise DifflmError(
            f"the training split has {len(windows)} prompts of {prompt_length} tokens: lower --count"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    tok = teacher.tokenizer
    banned = [i for i in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id) if i is not None]
    with torch.inference_mode(), tqdm(total=count, desc="distill", unit="example") as bar:
        for start in range(0, count, batch):
            rows = range(start, min(start + batch, count))
            ids = torch.stack([windows[order[i]] for i in rows])
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in rows]
            out = generate_ar(
                teacher.model,
                ids,
                max_new_tokens=new_tokens,
                temperature=temperature,
                generator=generators,
                suppress_tokens=banned,
            )
            for row in out.tokens.tolist():
                yield _text_of(row, tok)
            bar.update(len(ids))


def _text_of(ids: list[int], tok: Tokenizer) -> str:
    """The example's text, refused when it would not tokenize back to the same ids (a BPE merge
    across the prompt's edge would shift every later block of the training file)."""
    text = tok.decode(ids)
    if tok.encode(text) != ids:
        raise DifflmError(
            "a continuation does not re-tokenize to its own ids: distil with a char-level teacher"
        )
    return text
