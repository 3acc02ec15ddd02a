"""AR vs masked diffusion vs block diffusion (BD3) on Tiny Shakespeare: the reference table.

    python benchmarks/shakespeare_core.py --run ar=RUN_AR --run mdm=RUN_MDM --run bd3_4=RUN_BD3 \
        [--run bd3_16=...] --judge RUN_AR --out docs/results/shakespeare_core

Each run folder is a finished `difflm train` run (same transformer, same data and token budget).
For each: the validation likelihood in nats/char (AR: next-token NLL; diffusion: the ELBO bound,
with the run's own block length K, and the exact NLL of decoding it one token a step left to right
in each block), the validation curve from its log, and continuations of held-out prompts sampled at
temperature 1 (AR: ancestral; diffusion: one token per step, block-causal for BD3, most confident
first and left to right), scored by the AR judge's perplexity (gen-ppl), the share of their words
found in the corpus and the longest run of a repeated word. Writes results.json, table.md, samples.md,
curves.png and command.txt into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflm.data.blocks import text_blocks
from difflm.data.corpora import resolve_corpus
from difflm.evaluate.likelihood import ar_nll, elbo_nll, left_to_right_nll
from difflm.evaluate.metrics import word_quality, words
from difflm.pretrained import Pretrained, load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.unmask import SampleConfig, generate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run", action="append", required=True, metavar="NAME=PATH", help="a finished run (repeat)"
    )
    p.add_argument("--judge", required=True, help="the AR run that scores continuations")
    p.add_argument("--out", required=True, help="results folder (e.g. docs/results/shakespeare_core)")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts continued per model")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=96)
    p.add_argument("--samples", type=int, default=4, help="Monte-Carlo draws of t per sequence (ELBO)")
    p.add_argument("--max-batches", type=int, default=None, help="val batches scored (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (models, scoring and sampling)")
    return p.parse_args()


def likelihood(pre: Pretrained, args: argparse.Namespace) -> float:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    if pre.config.task == "autoregressive":
        return ar_nll(pre.model, val, max_batches=args.max_batches, progress=False)
    return elbo_nll(
        pre.model,
        val,
        schedule=pre.config.diffusion.schedule,
        mask_token_id=pre.tokenizer.mask_token_id,
        vocab_size=pre.tokenizer.vocab_size,
        samples=args.samples,
        max_batches=args.max_batches,
        progress=False,
        block_length=pre.config.diffusion.block_length,
    )


def exact_left_to_right(pre: Pretrained, args: argparse.Namespace) -> float:
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    return left_to_right_nll(
        pre.model,
        val,
        mask_token_id=pre.tokenizer.mask_token_id,
        vocab_size=pre.tokenizer.vocab_size,
        max_batches=args.max_batches,
        progress=False,
        block_length=pre.config.diffusion.block_length,
    )


def held_out_prompts(pre: Pretrained, n: int, length: int) -> torch.Tensor:
    """n prompts of `length` characters spread over the validation tail of the corpus [n, P]."""
    text = resolve_corpus(pre.config.data.path).read_text(encoding="utf-8")
    tail = text[int(len(text) * (1 - pre.config.data.val_fraction)) :]
    step = (len(tail) - length) // n
    return torch.tensor([pre.tokenizer.encode(tail[i * step : i * step + length]) for i in range(n)])


def continue_prompts(
    pre: Pretrained, ids: torch.Tensor, args: argparse.Namespace, remasking: str = "low_confidence"
) -> torch.Tensor:
    """Continuations [n, G] at temperature 1, one token per step for the diffusion models, revealed
    in `remasking` order."""
    G = args.gen_length
    gen = [torch.Generator().manual_seed(args.seed + row) for row in range(len(ids))]
    if pre.config.task == "autoregressive":
        return generate_ar(pre.model, ids, max_new_tokens=G, temperature=1.0, generator=gen).tokens[:, -G:]
    K = pre.config.diffusion.block_length
    cfg = SampleConfig(
        gen_length=G,
        steps=G,
        block_length=K,
        block_causal=K is not None,
        cache="prefix" if K is not None else "none",
        temperature=1.0,
        remasking=remasking,
        suppress_tokens=sorted(i for i in pre.tokenizer.special_ids if i != pre.tokenizer.mask_token_id),
    )
    return generate(pre.model, ids, cfg, generator=gen).tokens[:, -G:]


def gen_ppl(judge: torch.nn.Module, prompts: torch.Tensor, continuation: torch.Tensor) -> float:
    """exp(mean NLL) of the continuations under the AR judge, given their prompts."""
    full = torch.cat([prompts, continuation], dim=1)
    logits = judge(full[:, :-1]).float()  # [n, P+G-1, V]
    P = prompts.shape[1]
    return math.exp(float(F.cross_entropy(logits[:, P - 1 :].transpose(1, 2), full[:, P:])))


def val_curve(run: Path) -> list[tuple[int, float]]:
    """The run's logged validation losses; none for a folder that is not a run's (an exported copy)."""
    log = Path(run) / "log.jsonl"
    if not log.is_file():
        return []
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines if '"val_loss"' in line]
    return [(r["step"], r["val_loss"]) for r in records]


def evaluate_run(name: str, run: str, judge: Pretrained, vocab: set[str], args) -> dict:
    start = time.perf_counter()
    pre = load_pretrained(run, args.device)
    ids = held_out_prompts(pre, args.prompts, args.prompt_length).to(args.device)
    with torch.no_grad():
        nll = likelihood(pre, args)
        cont = continue_prompts(pre, ids, args)
        ppl = gen_ppl(judge.model, ids, cont)
    texts = [pre.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in cont]
    quality = [word_quality(t, vocab) for t in texts]
    state = json.loads((pre.path / "trainer_state.json").read_text())
    ordered = {} if pre.config.task == "autoregressive" else left_to_right(pre, ids, judge, vocab, args)
    return {
        "name": name,
        "run": run,
        "task": pre.config.task,
        "block_length": pre.config.diffusion.block_length if pre.config.task != "autoregressive" else None,
        "steps": state["step"],
        "tokens_seen": state.get("tokens_seen"),
        "params": sum(p.numel() for p in pre.model.parameters()),
        "val_nll": nll,
        "gen_ppl": ppl,
        "words_in_corpus": sum(q["in_corpus"] for q in quality) / len(quality),
        "max_repeat": max(q["max_repeat"] for q in quality),
        "prompt": pre.tokenizer.decode(ids[0].tolist()),
        "samples": texts,
        "curve": val_curve(pre.path.parent.parent),  # run/checkpoints/step-N -> run
        **ordered,
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def left_to_right(pre: Pretrained, ids: torch.Tensor, judge: Pretrained, vocab: set[str], args) -> dict:
    """A diffusion model decoded left to right: its exact NLL, and its continuations' figures."""
    with torch.no_grad():
        nll = exact_left_to_right(pre, args)
        cont = continue_prompts(pre, ids, args, remasking="left_to_right")
        ppl = gen_ppl(judge.model, ids, cont)
    texts = [pre.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in cont]
    quality = [word_quality(t, vocab) for t in texts]
    return {
        "left_to_right_nll": nll,
        "left_to_right_gen_ppl": ppl,
        "left_to_right_words_in_corpus": sum(q["in_corpus"] for q in quality) / len(quality),
        "left_to_right_samples": texts,
    }


def kind(r: dict) -> str:
    if r["task"] == "autoregressive":
        return "AR (next-token NLL)"
    return f"BD3 K={r['block_length']} (ELBO bound)" if r["block_length"] else "masked diffusion (ELBO bound)"


def ordered_cells(r: dict, ar: float | None) -> str:
    """The left-to-right columns of a diffusion row ("-" for the AR model, which is its own order)."""
    if "left_to_right_nll" not in r:
        return "- | - | - | -"
    gap = "-" if ar is None else f"{r['left_to_right_nll'] - ar:+.3f}"
    return (
        f"{r['left_to_right_nll']:.3f} | {gap} | {r['left_to_right_gen_ppl']:.2f} "
        f"| {100 * r['left_to_right_words_in_corpus']:.1f}%"
    )


def write_results(results: list[dict], args: argparse.Namespace, seconds: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ar = next((r["val_nll"] for r in results if r["task"] == "autoregressive"), None)
    head = (
        "| model | steps | val nats/char | gap to AR | gen-ppl (AR judge) | words in corpus | longest repeat "
        "| left to right: exact NLL | its gap to AR | gen-ppl | words in corpus |"
    )
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gap = "-" if ar is None else f"{r['val_nll'] - ar:+.3f}"
        rows.append(
            f"| {r['name']}: {kind(r)} | {r['steps']} | {r['val_nll']:.3f} | {gap} | {r['gen_ppl']:.2f} "
            f"| {100 * r['words_in_corpus']:.1f}% | {r['max_repeat']} | {ordered_cells(r, ar)} |"
        )
    (out / "table.md").write_text("\n".join(rows) + "\n")
    samples = [
        f"## {r['name']}\n\nprompt: `{r['prompt']!r}`\n\n```\n{r['samples'][0]}\n```\n" for r in results
    ]
    (out / "samples.md").write_text("\n".join(samples))
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "wall_seconds": round(seconds, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, fp32",
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    (out / "command.txt").write_text(meta["command"] + "\n")
    plot_curves(results, out / "curves.png")
    print("\n".join(rows))


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in (r for r in results if r["curve"]):
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['name']} ({kind(r)})")
    ax.set_xlabel("step")
    ax.set_ylabel("trainer val loss (nats/char)")  # diffusion: the bound over the run's own t range
    ax.set_title("Tiny Shakespeare validation curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    judge = load_pretrained(args.judge, args.device)
    vocab = set(words(resolve_corpus(judge.config.data.path).read_text(encoding="utf-8")))
    results = []
    for spec in args.run:
        name, _, run = spec.partition("=")
        results.append(evaluate_run(name, run, judge, vocab, args))
        print(f"{name}: val {results[-1]['val_nll']:.3f}, gen-ppl {results[-1]['gen_ppl']:.2f}", flush=True)
    write_results(results, args, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
