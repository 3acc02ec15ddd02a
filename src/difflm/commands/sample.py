"""`difflm sample CKPT --prompt ...`: generate from a checkpoint, dispatching on its task.

Masked-diffusion checkpoints go through the one unmasking engine (`difflm.sampling.unmask`),
autoregressive ones through the KV-cached AR decoder; both can be traced, animated to a GIF or
HTML page, and replayed live in the terminal.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from difflm.data.conversations import chat_prompt_ids
from difflm.errors import DifflmError
from difflm.evaluate.sgdd import sample_sgdd
from difflm.pretrained import Pretrained, load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.trace import Trace, render_gif, render_html, render_live
from difflm.sampling.unmask import SampleConfig, SampleResult, generate
from difflm.systems.forcing import sample_diffusion_forcing
from difflm.systems.qwen3_llada import sample as sample_qwen3_llada


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step folder or a run folder (its latest checkpoint)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", default=None, help="a file with one prompt per line")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: gen length; 0 with --threshold/--factor: each block until filled)",
    )
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument(
        "--block-attention",
        action="store_true",
        help="attend under the block bias of training (prompt + own block [+ earlier]); needs --block-length",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="format each prompt as a chat turn (chat template, else as in SFT)",
    )
    parser.add_argument(
        "--schedule", default=None, help="Diffusion Forcing scheduling matrix (pyramid, full_sequence, ...)"
    )
    parser.add_argument("--horizon", type=int, default=None, help="Diffusion Forcing tokens per chunk")
    parser.add_argument("--reveal-schedule", default="even", choices=("even", "cosine", "linear"))
    parser.add_argument(
        "--remasking",
        default="low_confidence",
        choices=("low_confidence", "random", "random_topk", "margin", "entropy"),
    )
    parser.add_argument("--mode", default="keep", choices=("keep", "resample"))
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument(
        "--threshold", type=float, default=None, help="reveal every token with confidence >= this"
    )
    parser.add_argument(
        "--factor", type=float, default=None, help="reveal the n best with (n+1)(1 - c_n) < factor"
    )
    parser.add_argument(
        "--cache", default="none", choices=("none", "prefix", "dual"), help="KV cache within a block"
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance weight (default 0; SGDD: its system.cfg_scale)",
    )
    parser.add_argument(
        "--text", action="append", default=None, help="SGDD: a text to reconstruct/paraphrase (repeat)"
    )
    parser.add_argument(
        "--interpolate", nargs=2, metavar=("A", "B"), default=None, help="SGDD: decode between two texts"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="SGDD: interpolation weight of B in [0, 1]")
    parser.add_argument("--length", type=int, default=None, help="SGDD: output tokens (default: predicted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, help="samples per prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample")
    parser.add_argument(
        "--animate", default=None, help="write an animation of the first sample (.gif or .html)"
    )
    parser.add_argument(
        "--live", action="store_true", help="replay the denoising of the first sample in the terminal"
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise DifflmError(f"prompt file '{path}' not found")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DifflmError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    return [p for p in prompts for _ in range(args.batch_size)]


def encode_batch(tokenizer, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and attention mask [B, P]; `chat` formats each prompt as a user turn."""
    encoded = [chat_prompt_ids(tokenizer, p) if chat else tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        if e:
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
    return ids, mask


def sample_config(args: argparse.Namespace, tokenizer) -> SampleConfig:
    return SampleConfig(
        gen_length=args.gen_length,
        steps=args.gen_length if args.steps is None else args.steps,
        block_length=args.block_length,
        reveal_schedule=args.reveal_schedule,
        remasking=args.remasking,
        threshold=args.threshold,
        factor=args.factor,
        cache=args.cache,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        mode=args.mode,
        cfg_scale=args.cfg_scale or 0.0,
        suppress_tokens=sorted(i for i in tokenizer.special_ids if i != tokenizer.mask_token_id),
    )


def sample_masked(pre: Pretrained, args: argparse.Namespace, ids, mask, generator) -> SampleResult:
    if pre.tokenizer.mask_token_id is None or getattr(pre.model, "mask_token_id", None) is None:
        raise DifflmError(f"checkpoint '{pre.path}' has no mask token: it cannot be sampled by unmasking")
    cfg = sample_config(args, pre.tokenizer)
    config = getattr(pre.model, "config", None)
    max_length = (
        getattr(config, "block_size", None)  # difflm transformer, SGDD
        or getattr(config, "max_position_embeddings", None)  # Qwen3-LLaDA
        or getattr(pre.model, "max_length", None)  # HF masked LMs
    )
    return generate(
        pre.model,
        ids,
        cfg,
        attention_mask=mask,
        generator=generator,
        trace=bool(args.animate or args.live),
        max_length=max_length,
    )


def sample_autoregressive(
    pre: Pretrained, args: argparse.Namespace, ids, mask, generator, use_cache: bool = True
) -> SampleResult:
    """KV-cached decoding; `use_cache=False` (models without a cache, e.g. DFGPT in teacher-forcing
    mode) recomputes a sliding window of block_size tokens, so it may run past the model's length."""
    if args.gen_length < 1:
        raise DifflmError(f"--gen-length must be >= 1, got {args.gen_length}")
    limit = pre.model.config.block_size
    if use_cache and ids.shape[1] + args.gen_length > limit:
        raise DifflmError(
            f"prompt of {ids.shape[1]} tokens + gen length {args.gen_length} exceeds the model's length {limit}; "
            "shorten the prompt or lower --gen-length"
        )
    return generate_ar(
        pre.model,
        ids,
        max_new_tokens=args.gen_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        attention_mask=mask,
        trace=bool(args.animate or args.live),
        use_cache=use_cache,
    )


TEXT_SAMPLERS: dict[str, Callable[[Pretrained, argparse.Namespace], int]] = {"sgdd": sample_sgdd}

SAMPLERS: dict[str, Callable] = {
    "qwen3_llada_pretrain": sample_qwen3_llada,
    "qwen3_llada_sft": sample_qwen3_llada,
    "masked_diffusion": sample_masked,
    "prefix_diffusion": sample_masked,
    "poems_ar": sample_autoregressive,
    "autoregressive": sample_autoregressive,
    "teacher_forcing": functools.partial(sample_autoregressive, use_cache=False),
    "diffusion_forcing": sample_diffusion_forcing,
}


def token_strings(tokenizer) -> Callable[[list[int]], list[str]]:
    return lambda ids: [tokenizer.decode([i]) for i in ids]


def show_trace(trace: Trace, tokenizer, args: argparse.Namespace) -> None:
    if args.live:
        render_live(trace, token_strings(tokenizer))
    if args.animate:
        render = render_html if args.animate.endswith(".html") else render_gif
        print(f"animation: {render(trace, token_strings(tokenizer), args.animate)}")


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 0:
        raise DifflmError(f"--steps must be >= 0 (0 needs --threshold or --factor), got {args.steps}")
    pre = load_pretrained(args.checkpoint, args.device)
    if pre.config.task in TEXT_SAMPLERS:  # conditioned on whole texts, not prompts to continue
        return TEXT_SAMPLERS[pre.config.task](pre, args)
    if pre.config.task not in SAMPLERS:
        raise DifflmError(f"no sampler for task '{pre.config.task}'; known: {', '.join(SAMPLERS)}")
    prompts = read_prompts(args)
    ids, mask = encode_batch(pre.tokenizer, prompts, chat=args.chat)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        result = SAMPLERS[pre.config.task](pre, args, ids.to(args.device), mask.to(args.device), generator)
    seconds = time.perf_counter() - start
    for row, prompt in enumerate(prompts):
        text = pre.tokenizer.decode(result.tokens[row, ids.shape[1] :].tolist(), skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
        else:
            print(f"--- sample {row} ---\n{prompt}{text}")
    generated = len(prompts) * args.gen_length
    print(
        f"[{generated} tokens in {seconds:.2f}s, {generated / seconds:.1f} tok/s, {result.forward_passes} forward passes]",
        file=sys.stderr,
    )
    if result.trace is not None:
        show_trace(result.trace, pre.tokenizer, args)
    return 0
