"""The text systems on difflm's transformer: `masked_diffusion` (LLaDA-style) and `autoregressive`.

Each gets a builder (recipe -> `Run` on packed text blocks), an evaluator (ELBO bound or AR loss on
the validation split) and a sampler (the unmasking engine, or the KV-cached AR decoder). Other
systems reuse `fill_derived`, `require_family` and these evaluators and samplers.
"""

from __future__ import annotations

import dataclasses
import math

from difflm.config import RunConfig, model_family
from difflm.data.blocks import text_blocks
from difflm.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from difflm.errors import DifflmError
from difflm.evaluate.likelihood import (
    any_order_nll,
    ar_nll,
    check_any_order_block,
    elbo_nll,
    left_to_right_nll,
)
from difflm.evaluate.options import EvalOptions
from difflm.models import build_model
from difflm.pretrained import Pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.settings import SampleOptions, sample_config
from difflm.sampling.unmask import SampleResult, generate
from difflm.train.checkpoint import resolve_checkpoint
from difflm.train.objectives import AutoregressiveObjective, MaskedDiffusionObjective
from difflm.train.trainer import Run


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


def init_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    """The tokenizer of `train.init_from`'s checkpoint, when it saved one: a fine-tune must read
    ids as its weights learned them, and a character vocabulary rebuilt from other text would
    renumber them (or change the vocabulary's size). None: build one from the data."""
    if not cfg.train.init_from or cfg.train.resume:
        return None
    source = resolve_checkpoint(cfg.train.init_from)
    return load_tokenizer(source) if (source / TOKENIZER_FILE).is_file() else None


def require_family(cfg: RunConfig, family: str) -> None:
    if model_family(cfg.model) != family:
        raise DifflmError(f"task '{cfg.task}' trains model.family={family}, got {model_family(cfg.model)}")


def build_masked_diffusion(cfg: RunConfig) -> Run:
    require_family(cfg, "transformer")
    if getattr(cfg.model, "lookahead_row", False) and cfg.diffusion.block_length is None:
        raise DifflmError("model.lookahead_row is for block diffusion: set diffusion.block_length (e.g. 4)")
    tokenizer, train, val = text_blocks(cfg.data, init_tokenizer(cfg))
    fill_derived(cfg, tokenizer, causal=False)
    objective = MaskedDiffusionObjective(
        cfg.diffusion, mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size
    )
    return Run(build_model("transformer", cfg.model), objective, train, val, tokenizer)


def build_autoregressive(cfg: RunConfig) -> Run:
    require_family(cfg, "transformer")
    tokenizer, train, val = text_blocks(cfg.data, init_tokenizer(cfg))
    fill_derived(cfg, tokenizer, causal=True)
    return Run(build_model("transformer", cfg.model), AutoregressiveObjective(), train, val, tokenizer)


def eval_masked_diffusion(pre: Pretrained, opts: EvalOptions) -> dict:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    block_length = opts.block_length or pre.config.diffusion.block_length
    if opts.any_order:  # before the bound's passes, not after
        check_any_order_block(block_length)
    nll = elbo_nll(
        pre.model,
        val,
        schedule=pre.config.diffusion.schedule,
        mask_token_id=pre.tokenizer.mask_token_id,
        vocab_size=pre.tokenizer.vocab_size,
        batch_size=opts.batch_size,
        samples=opts.samples,
        seed=opts.seed,
        max_batches=opts.max_batches,
        block_length=block_length,
    )
    metrics = {
        "val_elbo_nll": nll,
        "val_ppl_bound": math.exp(nll),
        "samples": opts.samples,
        "block_length": block_length,
    }
    exact = {  # the exact likelihoods of a fixed and of a uniformly random reveal order
        "val_left_to_right_nll": (opts.left_to_right, left_to_right_nll),
        "val_any_order_nll": (opts.any_order, any_order_nll),
    }
    for key, (wanted, nll_of) in exact.items():
        if wanted:
            metrics[key] = nll_of(
                pre.model,
                val,
                mask_token_id=pre.tokenizer.mask_token_id,
                vocab_size=pre.tokenizer.vocab_size,
                block_length=block_length,
                batch_size=opts.batch_size,
                max_batches=opts.max_batches,
            )
    return metrics


def eval_autoregressive(pre: Pretrained, opts: EvalOptions) -> dict:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    nll = ar_nll(pre.model, val, batch_size=opts.batch_size, max_batches=opts.max_batches)
    return {"val_loss": nll, "val_ppl": math.exp(nll)}


def sample_masked(pre: Pretrained, opts: SampleOptions, ids, mask, generator) -> SampleResult:
    if pre.tokenizer.mask_token_id is None or getattr(pre.model, "mask_token_id", None) is None:
        raise DifflmError(f"checkpoint '{pre.path}' has no mask token: it cannot be sampled by unmasking")
    cfg = sample_config(opts, pre.tokenizer, pre.config.diffusion.block_length)
    return generate(
        pre.model,
        ids,
        cfg,
        attention_mask=mask,
        generator=generator,
        trace=opts.trace,
        max_length=pre.model.max_length,
    )


def sample_autoregressive(
    pre: Pretrained, opts: SampleOptions, ids, mask, generator, use_cache: bool = True
) -> SampleResult:
    """KV-cached decoding; `use_cache=False` (models without a cache, e.g. DFGPT in teacher-forcing
    mode) recomputes a sliding window of block_size tokens, so it may run past the model's length."""
    if opts.gen_length < 1:
        raise DifflmError(f"--gen-length must be >= 1, got {opts.gen_length}")
    limit = pre.model.max_length
    if use_cache and ids.shape[1] + opts.gen_length > limit:
        raise DifflmError(
            f"prompt of {ids.shape[1]} tokens + gen length {opts.gen_length} exceeds the model's length {limit}; "
            "shorten the prompt or lower --gen-length"
        )
    return generate_ar(
        pre.model,
        ids,
        max_new_tokens=opts.gen_length,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        generator=generator,
        attention_mask=mask,
        trace=opts.trace,
        use_cache=use_cache,
    )


def sample_uncached(pre: Pretrained, opts: SampleOptions, ids, mask, generator) -> SampleResult:
    return sample_autoregressive(pre, opts, ids, mask, generator, use_cache=False)
