"""`difflm sample CKPT --prompt ...`: generate from a checkpoint, dispatching on its task.

Masked-diffusion checkpoints go through the one unmasking engine (`difflm.sampling.unmask`),
autoregressive ones through the KV-cached AR decoder; both can be traced, animated to a GIF or
HTML page, and replayed live in the terminal. torch and the samplers are imported when a command
runs (the system registry names them), so `difflm sample --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from difflm.commands.flags import add_flags, options_from
from difflm.errors import DifflmError
from difflm.sampling.settings import SampleOptions

if TYPE_CHECKING:
    import torch

    from difflm.sampling.trace import Trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step folder or a run folder (its latest checkpoint)")
    add_flags(parser, SampleOptions)


def read_prompts(opts: SampleOptions) -> list[str]:
    prompts = list(opts.prompt or [])
    if opts.prompt_file:
        path = Path(opts.prompt_file)
        if not path.is_file():
            raise DifflmError(f"prompt file '{path}' not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DifflmError(
                f"prompt file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DifflmError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    return [p for p in prompts for _ in range(opts.batch_size)]


def encode_batch(tokenizer, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and attention mask [B, P]; `chat` formats each prompt as a user turn."""
    import torch

    from difflm.data.conversations import chat_prompt_ids

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


def corpus_words(name_or_path: str) -> set[str]:
    """The set of words of a corpus (a name from `difflm data list` or a text file)."""
    from difflm.data.corpora import resolve_corpus
    from difflm.evaluate.metrics import words

    return set(words(resolve_corpus(name_or_path).read_text(encoding="utf-8")))


def token_strings(tokenizer) -> Callable[[list[int]], list[str]]:
    return lambda ids: [tokenizer.decode([i]) for i in ids]


def show_trace(trace: Trace, tokenizer, opts: SampleOptions) -> None:
    from difflm.sampling.trace import render_gif, render_html, render_live

    if opts.live:
        render_live(trace, token_strings(tokenizer))
    if opts.animate:
        render = render_html if opts.animate.endswith(".html") else render_gif
        print(f"animation: {render(trace, token_strings(tokenizer), opts.animate)}")


def check_args(opts: SampleOptions) -> None:
    """Flags checked before any model is loaded: counts, finite numbers, a writable --animate path."""
    for flag in ("block_length", "gen_length", "length", "best_of", "search_patience"):
        value = getattr(opts, flag)
        if value is not None and value < 1:
            raise DifflmError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if opts.steps is not None and opts.steps < 0:
        raise DifflmError(f"--steps must be >= 0 (0 needs --threshold or --factor), got {opts.steps}")
    for flag in ("rounds", "search"):
        if getattr(opts, flag) < 0:
            raise DifflmError(f"--{flag} must be >= 0, got {getattr(opts, flag)}")
    if not (math.isfinite(opts.fluency) and opts.fluency >= 0):
        raise DifflmError(f"--fluency must be a finite number >= 0 (0 = cosine only), got {opts.fluency}")
    if opts.batch_size < 1:
        raise DifflmError(f"--batch-size must be >= 1 (samples per prompt), got {opts.batch_size}")
    for flag in ("temperature", "top_p", "threshold", "factor", "cfg_scale", "alpha"):
        value = getattr(opts, flag)
        if value is not None and not math.isfinite(value):
            raise DifflmError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if opts.block_attention and opts.block_length is None:
        raise DifflmError("--block-attention needs --block-length (the block the bias is built from)")
    if opts.animate:
        check_output_file(opts.animate, "--animate", (".gif", ".html"))


# flags only some tasks read -> those tasks (elsewhere they would be silently ignored)
TASK_FLAGS: dict[str, tuple[str, ...]] = {
    "schedule": ("diffusion_forcing",),
    "horizon": ("diffusion_forcing",),
    "block_attention": ("qwen3_llada_pretrain", "qwen3_llada_sft"),
    "text": ("sgdd",),
    "interpolate": ("sgdd",),
    "best_of": ("sgdd",),
    "rounds": ("sgdd",),
    "search": ("sgdd",),
    "search_patience": ("sgdd",),
    "fluency": ("sgdd",),
}


def check_task_flags(task: str, opts: SampleOptions) -> None:
    for flag, tasks in TASK_FLAGS.items():
        if getattr(opts, flag, None) not in (None, False) and task not in tasks:
            raise DifflmError(
                f"--{flag.replace('_', '-')} is for {' / '.join(tasks)} checkpoints; this one's task is '{task}'"
            )


def check_output_file(path: str, flag: str, suffixes: tuple[str, ...]) -> None:
    """An output file: a known extension, in an existing folder, not a folder itself."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise DifflmError(f"{flag} {path}: the file must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise DifflmError(f"{flag} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise DifflmError(f"{flag} {path}: folder '{out.parent}' does not exist; create it first")
    existed = out.exists()
    try:
        with open(out, "ab"):  # a probe: fail now, not after minutes of sampling
            pass
    except OSError as err:
        raise DifflmError(
            f"{flag} {path} cannot be written ({err.strerror}); choose a writable folder"
        ) from None
    if not existed:
        out.unlink()


def run(parsed: argparse.Namespace) -> int:
    import torch

    from difflm.evaluate.metrics import word_quality
    from difflm.pretrained import load_pretrained
    from difflm.systems.registry import get_system, resolve
    from difflm.train.trainer import resolve_device

    opts = options_from(SampleOptions, parsed)
    check_args(opts)
    resolve_device(opts.device, "--device")
    pre = load_pretrained(parsed.checkpoint, opts.device, verify=not opts.no_verify)
    check_task_flags(pre.config.task, opts)
    system = get_system(pre.config.task)
    if system.sample_texts:  # conditioned on whole texts, not prompts to continue
        return resolve(system.sample_texts)(pre, opts)
    if system.sample is None:
        raise DifflmError(f"task '{system.name}' has no sampler (see difflm systems)")
    prompts = read_prompts(opts)
    ids, mask = encode_batch(pre.tokenizer, prompts, chat=opts.chat)
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed)
    start = time.perf_counter()
    with torch.no_grad():
        sampler = resolve(system.sample)
        result = sampler(pre, opts, ids.to(opts.device), mask.to(opts.device), generator)
    seconds = time.perf_counter() - start
    vocabulary = corpus_words(opts.word_check) if opts.word_check else None
    for row, prompt in enumerate(prompts):
        text = pre.tokenizer.decode(result.tokens[row, ids.shape[1] :].tolist(), skip_special_tokens=True)
        quality = {} if vocabulary is None else word_quality(text, vocabulary)
        if opts.json:
            print(json.dumps({"prompt": prompt, "completion": text, **quality}, ensure_ascii=False))
        else:
            print(f"--- sample {row} ---\n{prompt}{text}")
            if quality:
                print(
                    f"[words in corpus: {100 * quality['in_corpus']:.1f}%, longest repeat: {quality['max_repeat']}]"
                )
    generated = len(prompts) * opts.gen_length
    stats = {
        "tokens": generated,
        "seconds": round(seconds, 4),
        "tokens_per_second": round(generated / seconds, 2),
        "forward_passes": result.forward_passes,
    }
    if opts.json:
        print(json.dumps({"run": stats}))
    print(
        f"[{generated} tokens in {seconds:.2f}s, {generated / seconds:.1f} tok/s, {result.forward_passes} forward passes]",
        file=sys.stderr,
    )
    if result.trace is not None:
        show_trace(result.trace, pre.tokenizer, opts)
    return 0
