"""`SampleConfig`: how the unmasking engine turns masks into text (its settings and their checks);
`SampleOptions`: what `difflm sample` asks of a checkpoint (its flags are made from these fields)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difflm.errors import DifflmError
from difflm.fields import like, opt

# the names the settings offer; torch-free, so `difflm sample --help` imports no torch
REMASKING = ("low_confidence", "random", "random_topk", "margin", "entropy", "left_to_right")
CACHE_MODES = ("none", "prefix", "dual", "delayed")  # sampling/cache.py
MASK_SCHEDULES: dict[str, Callable[[float], float]] = {  # share of a block still masked after ratio r
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: math.cos(math.pi / 2 * r),
}
REVEAL_SCHEDULES = ("even", *MASK_SCHEDULES)  # sampling/draw.py: reveal_counts


@dataclass
class SampleConfig:
    """How to turn masks into text."""

    gen_length: int = opt(64, "Number of tokens to generate after the prompt.")
    steps: int = opt(
        64,
        "Denoising steps in total (forward passes without guidance); 0 with a threshold or factor: "
        "no step count, each block runs until it is filled (Fast-dLLM's rule).",
    )
    block_length: int | None = opt(
        None, "Generate in blocks of this many tokens, left to right (null = one block)."
    )
    reveal_schedule: str = opt("even", "How many tokens each step reveals.", choices=REVEAL_SCHEDULES)
    remasking: str = opt(
        "low_confidence",
        "Which masked positions to reveal first (left_to_right: the leftmost, an AR order inside each block).",
        choices=REMASKING,
    )
    topk_pool: int = opt(4, "random_topk: reveal at random among this many most confident positions.")
    threshold: float | None = opt(
        None,
        "Also reveal every position whose confidence is >= this (at least one per step; with "
        "remasking left_to_right, the leftmost such run); the reveal schedule stays a floor and "
        "steps a cap unless steps is 0.",
    )
    factor: float | None = opt(
        None, "Also reveal the n most confident positions, n the largest with (n+1)(1 - c_n) < factor."
    )
    cache: str = opt(
        "none",
        "KV cache within a block: prefix (reuse keys before the block), dual (before and after), "
        "delayed (dual, refreshing only the previous block at a block's start).",
        CACHE_MODES,
    )
    temperature: float = opt(0.0, "Sampling temperature (0 = argmax).")
    top_k: int | None = opt(None, "Sample among the k most likely tokens (null/0 = all).")
    top_p: float | None = opt(None, "Nucleus sampling mass in (0, 1] (null = off).")
    confidence_from_tempered: bool = opt(
        False, "Score confidence on the tempered, filtered distribution instead of the raw one."
    )
    mode: str = opt(
        "keep",
        "keep: revealed tokens never change; resample: redraw the block every step.",
        ("keep", "resample"),
    )
    cfg_scale: float = opt(0.0, "Classifier-free guidance weight w: cond + w * (cond - uncond); 0 = off.")
    eos_token_id: int | None = opt(None, "End-of-sequence id (needed by eos_mode stop/fill).")
    eos_mode: str = opt(
        "none",
        "stop: end once every row has EOS; fill: EOS after a row's first EOS.",
        ("none", "stop", "fill"),
    )
    suppress_tokens: list[int] = opt([], "Token ids never generated (the mask token always is).")
    block_causal: bool = opt(
        False,
        "Block diffusion (BD3) decoding: blocks of block_length aligned at multiples of it from position 0 "
        "(the prompt is left padded to a multiple), each attending to itself and earlier blocks only, "
        "so a cache (prefix or dual) holds finished blocks exactly and is written once per block.",
    )
    rows_apart: bool = opt(
        True,
        "Block-causal decoding with a cache and steps 0: each row moves to its next block as soon as "
        "its own block is filled instead of waiting for the batch (the same tokens, fewer forwards).",
    )

    def __post_init__(self) -> None:
        if self.gen_length < 1:
            raise DifflmError(f"sample.gen_length must be >= 1, got {self.gen_length}")
        if self.steps == 0:
            if self.threshold is None and self.factor is None or self.mode != "keep":
                raise DifflmError(
                    "sample.steps=0 (reveal until each block is filled) needs sample.threshold or "
                    "sample.factor and mode keep; set one, or give a step count"
                )
        elif not 1 <= self.steps <= self.gen_length:
            raise DifflmError(
                f"sample.steps must be in [1, gen_length={self.gen_length}] (each step reveals >= 1 token), got {self.steps}"
            )
        if self.block_length is not None and self.block_length < 1:
            raise DifflmError(f"sample.block_length must be >= 1 or null, got {self.block_length}")
        if self.block_length is not None and self.block_length > self.gen_length and not self.block_causal:
            raise DifflmError(
                f"block length {self.block_length} larger than the generation length {self.gen_length}; "
                "lower sample.block_length or set it to null"
            )
        n_blocks = len(self.block_sizes(self.gen_length))
        if 0 < self.steps < n_blocks:
            raise DifflmError(
                f"sample.steps={self.steps} is fewer than the {n_blocks} blocks; raise steps or block_length"
            )
        for name, choices in (("reveal_schedule", REVEAL_SCHEDULES), ("remasking", REMASKING)):
            if getattr(self, name) not in choices:
                raise DifflmError(
                    f"sample.{name} must be one of {list(choices)}, got {getattr(self, name)!r}"
                )
        if self.mode not in ("keep", "resample") or self.eos_mode not in ("none", "stop", "fill"):
            raise DifflmError("sample.mode must be keep|resample and sample.eos_mode none|stop|fill")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise DifflmError(f"sample.threshold must be in (0, 1] or null, got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise DifflmError(f"sample.factor must be > 0 or null, got {self.factor}")
        if self.cache not in CACHE_MODES:
            raise DifflmError(f"sample.cache must be one of {list(CACHE_MODES)}, got {self.cache!r}")
        if self.temperature < 0:
            raise DifflmError(f"sample.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise DifflmError(f"sample.top_k must be >= 0 or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DifflmError(f"sample.top_p must be in (0, 1] or null, got {self.top_p}")
        if self.cfg_scale < 0:
            raise DifflmError(f"sample.cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.topk_pool < 1:
            raise DifflmError(f"sample.topk_pool must be >= 1, got {self.topk_pool}")
        if self.eos_mode != "none" and self.eos_token_id is None:
            raise DifflmError(f"sample.eos_mode={self.eos_mode} needs sample.eos_token_id")
        if self.block_causal and self.block_length is None:
            raise DifflmError("sample.block_causal needs sample.block_length (the model's training block)")

    def block_sizes(self, n: int) -> list[int]:
        """Sizes of the blocks covering n positions (the last one may be shorter)."""
        size = n if self.block_length is None else min(self.block_length, n)
        return [size] * (n // size) + ([n % size] if n % size else [])


@dataclass
class SampleOptions:
    """The settings of `difflm sample`, as a system's sampler reads them (one flag per field).

    Engine settings left None here are decided per checkpoint (`sample_config`)."""

    prompt: list[str] | None = opt(None, "a prompt (repeat for a batch)")
    prompt_file: str | None = opt(None, "a file with one prompt per line")
    gen_length: int = like(SampleConfig, "gen_length", default=128)
    steps: int | None = like(
        SampleConfig,
        "steps",
        default=None,
        help="denoising steps (default: gen length; 0 with --threshold/--factor: each block until filled)",
    )
    block_length: int | None = like(SampleConfig, "block_length")
    block_attention: bool = opt(
        False,
        "attend under the block bias of training (prompt + own block [+ earlier]); needs --block-length",
    )
    chat: bool = opt(False, "format each prompt as a chat turn (chat template, else as in SFT)")
    schedule: str | None = opt(None, "Diffusion Forcing scheduling matrix (pyramid, full_sequence, ...)")
    horizon: int | None = opt(None, "Diffusion Forcing tokens per chunk")
    reveal_schedule: str = like(SampleConfig, "reveal_schedule")
    remasking: str = like(SampleConfig, "remasking")
    mode: str = like(SampleConfig, "mode")
    temperature: float = like(SampleConfig, "temperature")
    top_k: int | None = like(SampleConfig, "top_k")
    top_p: float | None = like(SampleConfig, "top_p")
    threshold: float | None = like(SampleConfig, "threshold")
    factor: float | None = like(SampleConfig, "factor")
    cache: str = like(SampleConfig, "cache")
    cfg_scale: float | None = like(
        SampleConfig,
        "cfg_scale",
        default=None,
        help="classifier-free guidance weight (default 0; SGDD: its system.cfg_scale)",
    )
    text: list[str] | None = opt(None, "SGDD: a text to reconstruct/paraphrase (repeat)")
    interpolate: tuple[str, str] | None = opt(None, "SGDD: decode between two texts", metavar=("A", "B"))
    alpha: float = opt(0.5, "SGDD: interpolation weight of B in [0, 1]")
    length: int | None = opt(None, "SGDD: output tokens (default: predicted)")
    best_of: int | None = opt(
        None, "SGDD: decode N candidates, keep the one the encoder finds closest (default 1)"
    )
    rounds: int = opt(0, "SGDD: correction rounds (re-mask the least likely tokens, keep if closer)")
    search: int = opt(0, "SGDD: edit-search rounds at most (best-first over single-token edits the decoder proposes)")
    search_patience: int | None = opt(
        None, "SGDD: search rounds without a closer text before a sentence stops (default 3; 1: greedy)"
    )
    fluency: float = opt(
        0.0,
        "SGDD: after --search, choose among the 32 closest texts by cosine + W * the decoder's "
        "pseudo-log-likelihood (nats; 0.001 was chosen on training sentences; 0: cosine only)",
    )
    seed: int = opt(0, "seed of the sampler's generator")
    batch_size: int = opt(1, "samples per prompt")
    device: str = opt("cpu", "the device to sample on (e.g. cpu, cuda)")
    json: bool = opt(False, "one JSON object per sample, then one for the run (tokens, seconds, forwards)")
    word_check: str | None = opt(
        None,
        "score each sample's words against a corpus (name or file): share found there, longest repeat",
        metavar="CORPUS",
    )
    animate: str | None = opt(None, "write an animation of the first sample (.gif or .html)")
    live: bool = opt(False, "replay the denoising of the first sample in the terminal")
    no_verify: bool = opt(False, "skip the sha256 check of the checkpoint's files (sizes only)")

    @property
    def trace(self) -> bool:
        """Whether the sampler records every step (for --animate / --live)."""
        return bool(self.animate or self.live)


def sample_config(opts: SampleOptions, tokenizer: Any, bd3_block: int | None = None) -> SampleConfig:
    """The engine's settings from `difflm sample`'s options; a block-diffusion checkpoint
    (`bd3_block` K) decodes block-causally in blocks of K unless --block-length says otherwise."""
    return SampleConfig(
        gen_length=opts.gen_length,
        steps=opts.gen_length if opts.steps is None else opts.steps,
        block_length=opts.block_length or bd3_block,
        block_causal=bd3_block is not None,
        reveal_schedule=opts.reveal_schedule,
        remasking=opts.remasking,
        threshold=opts.threshold,
        factor=opts.factor,
        cache=opts.cache,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        mode=opts.mode,
        cfg_scale=opts.cfg_scale or 0.0,
        suppress_tokens=sorted(i for i in tokenizer.special_ids if i != tokenizer.mask_token_id),
    )
