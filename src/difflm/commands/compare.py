"""`difflm compare DIFF_CKPT AR_CKPT --prompt ...`: one prompt, a masked-diffusion model and an
autoregressive one, animated side by side in one GIF, with wall time, tokens/s and forward passes.

DIFF_CKPT is any difflm checkpoint whose model has a mask token (masked_diffusion,
prefix_diffusion, ...), sampled by the one unmasking engine; the defaults are the seed's
(10 steps, top-k 50, top-p 0.95, temperature 1). AR_CKPT is a difflm causal checkpoint or a
Hugging Face causal LM folder/name, decoded with the KV-cached AR baseline and the same sampling
settings.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflm.commands.sample import check_output_file
from difflm.errors import DifflmError

if TYPE_CHECKING:  # imported when the command runs: torch and transformers take seconds
    import torch

    from difflm.sampling.unmask import SampleResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("diffusion", help="masked-diffusion checkpoint (step folder or run folder)")
    parser.add_argument(
        "ar", help="autoregressive difflm checkpoint, or a Hugging Face causal LM folder/name"
    )
    parser.add_argument("--prompt", required=True, help="the prompt both models continue")
    parser.add_argument("--gen-length", type=int, default=64, help="tokens each model generates")
    parser.add_argument("--steps", type=int, default=10, help="diffusion denoising steps")
    parser.add_argument(
        "--mode", default="keep", choices=("keep", "resample"), help="keep-revealed or resample-then-remask"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="compare.gif", help="the side-by-side animation (.gif)")
    parser.add_argument("--device", default="cpu")


@dataclass
class Side:
    """One model of the comparison: how to encode, decode and generate."""

    name: str
    model: Any
    encode: Any  # str -> list[int]
    decode: Any  # list[int] -> str
    max_length: int | None
    suppress: tuple[int, ...] = ()  # special ids the diffusion side never generates
    eos: int | None = None  # the AR side stops at it


def load_diffusion(where: str, device: str) -> Side:
    from difflm.pretrained import load_pretrained

    pre = load_pretrained(where, device)
    if getattr(pre.model, "mask_token_id", None) is None:
        raise DifflmError(f"'{where}' is not a masked-diffusion checkpoint (its model has no mask token)")
    tok = pre.tokenizer
    suppress = tuple(sorted(i for i in tok.special_ids if i != tok.mask_token_id))
    return Side(
        f"diffusion ({pre.config.task})", pre.model, tok.encode, tok.decode, pre.model.max_length, suppress
    )


def load_ar(where: str, device: str) -> Side:
    """A difflm checkpoint when the folder has one, else a Hugging Face causal LM."""
    from difflm.pretrained import load_pretrained
    from difflm.train.checkpoint import MANIFEST_FILE

    path = Path(where)
    if (path / MANIFEST_FILE).is_file() or (path / "checkpoints" / "latest").is_file():
        pre = load_pretrained(where, device)
        if not getattr(getattr(pre.model, "config", None), "causal", False):
            raise DifflmError(f"'{where}' is not a causal (autoregressive) checkpoint")
        tok = pre.tokenizer
        return Side(
            f"autoregressive ({pre.config.task})",
            pre.model,
            tok.encode,
            tok.decode,
            pre.model.max_length,
            eos=tok.eos_token_id,
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as err:
        raise DifflmError(f"'{where}' is neither a difflm checkpoint nor an HF causal LM: {err}") from None
    limit = getattr(model.config, "max_position_embeddings", None)
    return Side(
        f"autoregressive ({Path(where).name})",
        model,
        lambda s: tok.encode(s, add_special_tokens=False),
        tok.decode,
        limit,
        eos=tok.eos_token_id,
    )


def _ids(side: Side, prompt: str, gen_length: int, device: str) -> torch.Tensor:
    import torch

    ids = side.encode(prompt)
    if not ids:
        raise DifflmError("the prompt encodes to no tokens; pass a non-empty --prompt")
    if side.max_length is not None and len(ids) + gen_length > side.max_length:
        raise DifflmError(
            f"{side.name}: prompt of {len(ids)} tokens + --gen-length {gen_length} exceeds its length "
            f"{side.max_length}; shorten the prompt or lower --gen-length"
        )
    return torch.tensor([ids], device=device)


def _timed(fn) -> tuple[SampleResult, float]:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        result = fn()
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    import torch

    from difflm.sampling.autoregressive import generate_ar
    from difflm.sampling.trace import render_side_by_side_gif
    from difflm.sampling.unmask import SampleConfig, generate
    from difflm.train.trainer import resolve_device

    check_output_file(args.out, "--out", (".gif",))
    resolve_device(args.device, "--device")
    for flag in ("temperature", "top_p"):
        if not math.isfinite(getattr(args, flag)):
            raise DifflmError(
                f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}"
            )
    if args.gen_length < 1 or not 1 <= args.steps <= args.gen_length:
        raise DifflmError(
            f"need --gen-length >= 1 and 1 <= --steps <= gen length, got {args.gen_length}, {args.steps}"
        )
    diff, ar = load_diffusion(args.diffusion, args.device), load_ar(args.ar, args.device)
    sample = SampleConfig(
        gen_length=args.gen_length,
        steps=args.steps,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        mode=args.mode,
        suppress_tokens=list(diff.suppress),
    )
    d_ids, a_ids = (_ids(s, args.prompt, args.gen_length, args.device) for s in (diff, ar))
    gen = torch.Generator(device=args.device)
    d_out, d_sec = _timed(
        lambda: generate(diff.model, d_ids, sample, generator=gen.manual_seed(args.seed), trace=True)
    )
    a_out, a_sec = _timed(
        lambda: generate_ar(
            ar.model,
            a_ids,
            max_new_tokens=args.gen_length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=ar.eos,
            generator=gen.manual_seed(args.seed),
            trace=True,
        )
    )
    for side, out, seconds, ids in ((diff, d_out, d_sec, d_ids), (ar, a_out, a_sec, a_ids)):
        text = side.decode(out.tokens[0, ids.shape[1] :].tolist())
        print(f"--- {side.name} ---\n{args.prompt}{text}")
        print(
            f"[{args.gen_length} tokens in {seconds:.2f}s, {args.gen_length / seconds:.1f} tok/s, "
            f"{out.forward_passes} forward passes]"
        )
    decoders = [lambda ids, s=s: [s.decode([i]) for i in ids] for s in (diff, ar)]
    path = render_side_by_side_gif([d_out.trace, a_out.trace], [diff.name, ar.name], decoders, args.out)
    print(f"animation: {path}")
    return 0
