"""Evaluation of Teacher Forcing and Diffusion Forcing checkpoints (the same DFGPT, flag off / on).

Likelihood-style numbers (on the checkpoint's validation split):
  - TF `val_loss`: next-token cross-entropy, nats per character.
  - DF `rounding_nll_clean`: cross-entropy of each token given its own embedding at level 0 (and
    `rounding_nll_stab` at the context level, stabilization_level - 1), read through the rounding
    head.  The input contains the answer, lightly noised, so this measures how well the model maps
    a nearly clean embedding back to its token (the rounding / reconstruction error), NOT a
    predictive likelihood: it is not comparable to the TF val loss.
  - DF `next_token_nll`: the last token of each block at the top noise level, its clean past fed
    as the sampler feeds context; one denoising step, so a rough predictive analogue of `val_loss`.

Generation numbers: continuations of prompts cut from the held-out text, scored by a judge (a TF
checkpoint: `gen_ppl` = exp of its mean NLL per generated character), by BLEU and chrF against the
true continuation, and timed (`tokens_per_s`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.config import system_config
from difflm.data.blocks import text_blocks
from difflm.errors import DifflmError
from difflm.evaluate.likelihood import ar_nll
from difflm.evaluate.metrics import bleu, chrf
from difflm.evaluate.options import EvalOptions
from difflm.models.dfgpt import DFGPT
from difflm.pretrained import Pretrained, load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.forcing import sample_forcing
from difflm.systems.forcing import ForcingSystemConfig, sampling_diffusion
from difflm.train.objectives import forcing_loss
from difflm.train.trainer import collate


@dataclass
class ContinuationConfig:
    """How continuations are drawn for the generation metrics."""

    n_prompts: int = 8
    prompt_length: int = 64
    gen_length: int = 256
    temperature: float = 1.0  # TF sampling temperature (DF draws its own Gaussian noise)
    seed: int = 0


# ----------------------------------------------------------------------------- likelihood


def _val_batches(val, batch_size: int, max_batches: int | None):
    n = math.ceil(len(val) / batch_size)
    for b in range(min(n, max_batches or n)):
        yield collate([val[i] for i in range(b * batch_size, min(len(val), (b + 1) * batch_size))])[
            "input_ids"
        ]


@torch.no_grad()
def rounding_nll(
    model: DFGPT, val, level: int, *, batch_size: int = 32, max_batches: int | None = None, seed: int = 0
) -> float:
    """Mean rounding CE (nats per token) of every token given its own embedding at `level`."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    for ids in _val_batches(val, batch_size, max_batches):
        levels = torch.full(ids.shape, level, dtype=torch.long)  # [B, L]
        noise = model.diffusion.randn((*ids.shape, model.config.n_embd), g, device)  # [B, L, D]
        _, parts = forcing_loss(model, ids.to(device), levels, noise)
        total, count = total + parts["rounding_nll"].item() * ids.numel(), count + ids.numel()
    return total / count


@torch.no_grad()
def next_token_nll(
    model: DFGPT, val, *, batch_size: int = 32, max_batches: int | None = None, seed: int = 0
) -> float:
    """CE of each block's last token from pure noise (level T-1) in one step, its past clean as context."""
    diff, gcfg = model.diffusion, model.config.gaussian
    device, total, count = next(model.parameters()).device, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    for ids in _val_batches(val, batch_size, max_batches):
        ids = ids.to(device)  # [B, L]
        k = torch.full(ids.shape, diff.context_level, dtype=torch.long, device=device)
        k[:, -1] = gcfg.timesteps - 1
        noise = torch.zeros(*ids.shape, model.config.n_embd, device=device)  # [B, L, D]
        noise[:, -1] = diff.randn((ids.shape[0], model.config.n_embd), g, device)
        x_t = diff.q_sample(model.embed_clean(ids), k, noise)  # context: sqrt(alpha_bar) x0, as sampled
        x0_hat, _ = diff.split_prediction(model(x_t, k), x_t, k)  # [B, L, D]
        logits = model.round_logits(x0_hat[:, -1].clamp(-gcfg.clip_noise, gcfg.clip_noise))  # [B, V]
        total += F.cross_entropy(logits.float(), ids[:, -1], reduction="sum").item()
        count += ids.shape[0]
    return total / count


# ----------------------------------------------------------------------------- continuations


def held_out_windows(val, cfg: ContinuationConfig) -> tuple[Tensor, Tensor]:
    """(prompts [N, P], true continuations [N, G]) at evenly spaced offsets of the contiguous val text."""
    stream = torch.cat([val[i] for i in range(len(val))])  # val blocks are consecutive, non-overlapping
    span = cfg.prompt_length + cfg.gen_length
    if cfg.n_prompts < 1 or cfg.prompt_length < 1 or cfg.gen_length < 1:
        raise DifflmError("n_prompts, prompt_length and gen_length must all be >= 1")
    if span > len(stream):
        raise DifflmError(
            f"prompt + continuation ({span}) is longer than the val text ({len(stream)}); shorten them"
        )
    starts = torch.linspace(0, len(stream) - span, cfg.n_prompts).long().tolist()
    windows = torch.stack([stream[s : s + span] for s in starts])  # [N, P+G]
    return windows[:, : cfg.prompt_length], windows[:, cfg.prompt_length :]


def generate_continuations(
    pre: Pretrained, prompts: Tensor, cfg: ContinuationConfig, system: ForcingSystemConfig | None = None
) -> tuple[Tensor, float]:
    """(generated ids [N, G], seconds): TF by cache-less ancestral sampling, DF by `sample_forcing`."""
    model, device = pre.model, next(pre.model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = prompts.to(device)
    start = time.perf_counter()
    if model.config.use_diffusion_forcing:
        system = system or system_config(pre.config, ForcingSystemConfig)
        tokens, _ = sample_forcing(
            model,
            sampling_diffusion(model, system.sampling_timesteps),
            prompts,
            max_new_tokens=cfg.gen_length,
            horizon=system.horizon,
            schedule=system.schedule,
            uncertainty_scale=system.uncertainty_scale,
            generator=generator,
        )
    else:
        tokens = generate_ar(
            model,
            prompts,
            max_new_tokens=cfg.gen_length,
            temperature=cfg.temperature,
            generator=generator,
            use_cache=False,
        ).tokens
    return tokens[:, prompts.shape[1] :].cpu(), time.perf_counter() - start


@torch.no_grad()
def judge_nll(judge: DFGPT, prompts: Tensor, continuations: Tensor) -> float:
    """Mean NLL per continuation token under a TF judge, windows of its block_size sliding by half."""
    if judge.config.use_diffusion_forcing:
        raise DifflmError("the judge must be a teacher_forcing checkpoint (use_diffusion_forcing=false)")
    device = next(judge.parameters()).device
    seq = torch.cat([prompts, continuations], dim=1).to(device)  # [N, P+G]
    P, T, block = prompts.shape[1], seq.shape[1], judge.max_length
    total, t = 0.0, P
    while t < T:
        hi = min(T, t + max(1, block // 2))  # score targets t..hi-1
        lo = max(0, hi - block - 1)
        logits = judge(seq[:, lo : hi - 1])  # [N, hi-1-lo, V]: position j predicts seq[lo + j + 1]
        first = t - lo - 1
        targets = seq[:, t:hi]
        total += F.cross_entropy(
            logits[:, first:].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
        t = hi
    return total / continuations.numel()


def continuation_metrics(
    pre: Pretrained,
    val,
    cfg: ContinuationConfig,
    judge: Pretrained | None = None,
    system: ForcingSystemConfig | None = None,
) -> dict[str, float]:
    """gen_ppl (when a judge is given), BLEU, chrF against the held-out text, and tokens/s."""
    prompts, references = held_out_windows(val, cfg)
    generated, seconds = generate_continuations(pre, prompts, cfg, system)
    decode = pre.tokenizer.decode
    hyps = [decode(row.tolist(), skip_special_tokens=True) for row in generated]
    refs = [decode(row.tolist(), skip_special_tokens=True) for row in references]
    out = {
        "bleu": bleu(hyps, refs),
        "chrf": chrf(hyps, refs),
        "tokens_per_s": generated.numel() / seconds,
        "gen_tokens": generated.numel(),
    }
    if judge is not None:
        if judge.tokenizer.fingerprint() != pre.tokenizer.fingerprint():
            raise DifflmError(
                "the judge's tokenizer differs from the checkpoint's: judge with a model of the same data"
            )
        nll = judge_nll(judge.model, prompts, generated)
        out.update(gen_nll=nll, gen_ppl=math.exp(nll))
    return out


def forcing_metrics(
    pre: Pretrained,
    *,
    judge: Pretrained | None = None,
    continuations: ContinuationConfig | None = None,
    system: ForcingSystemConfig | None = None,
    batch_size: int = 32,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric of a teacher_forcing or diffusion_forcing checkpoint (see the module docstring)."""
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    model = pre.model
    kw = dict(batch_size=batch_size, max_batches=max_batches)
    if model.config.use_diffusion_forcing:
        stab = model.diffusion.context_level  # the level the sampler feeds context at
        out = {
            "rounding_nll_clean": rounding_nll(model, val, 0, seed=seed, **kw),
            "rounding_nll_stab": rounding_nll(model, val, stab, seed=seed, **kw),
            "next_token_nll": next_token_nll(model, val, seed=seed, **kw),
        }
    else:
        nll = ar_nll(model, val, progress=False, **kw)
        out = {"val_loss": nll, "val_ppl": math.exp(nll)}
    cont = continuations or ContinuationConfig(seed=seed)
    return {**out, **continuation_metrics(pre, val, cont, judge, system)}


def eval_forcing(pre: Pretrained, opts: EvalOptions) -> dict:
    """`difflm eval` entry of both systems; a TF checkpoint judges itself unless --judge is given."""
    judge_path = opts.judge
    if judge_path:
        judge = load_pretrained(judge_path, opts.device)
    else:
        judge = None if pre.model.config.use_diffusion_forcing else pre
    continuations = ContinuationConfig(
        n_prompts=opts.continuations,
        gen_length=opts.gen_length,
        seed=opts.seed,
    )
    return forcing_metrics(
        pre,
        judge=judge,
        continuations=continuations,
        batch_size=opts.batch_size,
        max_batches=opts.max_batches,
        seed=opts.seed,
    )
