"""Speed vs quality of fast masked-diffusion sampling (KV caches, parallel decoding) against AR.

One command: `python benchmarks/sampling.py [--quick] [--out FILE]`. Without --diffusion / --ar
checkpoints it trains a small char-level masked-diffusion transformer and an autoregressive one
of the same size on Tiny Shakespeare in-process (the one trainer), then samples the same prompts
with each method. Columns: tokens/s, speedup over vanilla, tokens/s as a multiple of the AR
model's in the same setting, forward passes, tokens per forward, token agreement with the vanilla
output (BD3 rows: with the first BD3 row), and generative perplexity judged by the AR model.

Every vanilla step is the same full forward over the whole sequence, so when --vanilla-blocks
limits vanilla to its first blocks (it is the slow baseline on CPU) its speed is measured on those
blocks, and agreement is measured on the positions it generated: with semi-autoregressive blocks
those tokens are final (later blocks are still all masks when they are decided).
`--vanilla-only` prints the vanilla-engine table instead (gen length 64/256, diffusion vs AR).
`--solo-prompts N` decodes N prompts one at a time at batch 1 (one row's gen-ppl is a noisy
figure), every decoder in turn on each prompt, so the machine's speed drift reaches all rows alike.
Each setting starts with an untimed warm-up of every decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from difflm.config import load_config
from difflm.data.corpora import resolve_corpus
from difflm.pretrained import load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.sampling.unmask import SampleConfig, generate
from difflm.systems.registry import build_run
from difflm.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATA = str(resolve_corpus("shakespeare"))  # a verified local copy, or downloaded once


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffusion", default=None, help="masked-diffusion checkpoint (default: train one)")
    p.add_argument("--ar", default=None, help="autoregressive checkpoint of equal size (default: train one)")
    p.add_argument("--bd3", default=None, help="block-diffusion checkpoint of equal size: adds its rows")
    p.add_argument(
        "--bd3-only", action="store_true", help="only the BD3 and AR rows (no full-sequence masked model)"
    )
    p.add_argument("--quick", action="store_true", help="smaller model, lengths, batches and training")
    p.add_argument("--vanilla-only", action="store_true", help="vanilla engine vs AR at gen length 64/256")
    p.add_argument("--out", default="runs/bench/sampling.md", help="write the tables here too")
    p.add_argument("--work-dir", default="runs/bench", help="trained checkpoints go here")
    p.add_argument("--gen-lengths", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument(
        "--solo-prompts",
        type=int,
        default=1,
        help="at batch 1, decode this many prompts one at a time (tok/s over all, forwards per prompt): "
        "one 256-character row is too few for a gen-ppl within 5%%",
    )
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--low-threshold", type=float, default=0.7)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--vanilla-blocks", type=int, default=None, help="run vanilla on this many blocks only")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="ROW",
        help="leave out these rows, by their exact names (e.g. 'prefix cache'; vanilla and AR always run)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("bf16", "fp32"),
        help="bf16 autocast pays only on CPUs with AVX512-BF16 (or GPUs); elsewhere it is far slower",
    )
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=16, help="sequences per training step")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument(
        "--train-only",
        choices=("masked_diffusion", "autoregressive"),
        default=None,
        help="train (or find) this model and exit: lets the two models train in parallel processes",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda (the models given with --diffusion/--ar/--bd3)"
    )
    return p.parse_args()


def train_model(task: str, args: argparse.Namespace, block_size: int, size: dict) -> str:
    """Train one char-level model on Tiny Shakespeare; returns the run folder."""
    out = Path(args.work_dir) / f"{task}-{block_size}-{size['n_layer']}x{size['n_embd']}"
    if (out / "checkpoints" / "latest").exists():
        return str(out)
    steps = args.train_steps or (120 if args.quick else 1500)
    overrides = [
        f"task={task}",
        *(f"model.{k}={v}" for k, v in size.items()),
        "model.dropout=0.0",
        f"data.path={DATA}",
        f"data.block_size={block_size}",
        f"data.cache_dir={Path(args.work_dir) / 'cache'}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.batch_size={args.train_batch}",
        "train.warmup_steps=20",
        "train.eval_every=0",
        "train.eval_batches=1",
        f"train.save_every={steps}",
        f"train.precision={args.precision}",
        "train.device=cpu",
        "train.progress=false",
        f"train.log_every={max(1, steps // 4)}",
    ]
    cfg = load_config(ROOT / "recipes/shakespeare_char.yaml", overrides)
    train(cfg, build_run(cfg))
    return str(out)


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """`batch` prompts of `length` characters from the held-out tail of the corpus [B, P]."""
    text = Path(DATA).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9) :]
    step = (len(tail) - length) // max(batch, 1)
    return torch.tensor([tokenizer.encode(tail[i * step : i * step + length]) for i in range(batch)])


def gen_ppl(judge, tokens: torch.Tensor, P: int, upto: int) -> float:
    """exp(mean NLL) of tokens[:, P:upto] under the causal judge, given everything before."""
    logits = judge(tokens[:, : upto - 1]).float()  # [B, upto-1, V]
    nll = F.cross_entropy(logits[:, P - 1 :].transpose(1, 2), tokens[:, P:upto])
    return math.exp(float(nll))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is queued: stop the clock when it is done
    return result, time.perf_counter() - start


@dataclasses.dataclass
class Joined:
    """The results of prompts decoded one at a time: tokens stacked, forwards per prompt."""

    tokens: torch.Tensor
    forward_passes: float


def time_all(fns: dict, ids: torch.Tensor, solo: bool) -> dict:
    """name -> (result, seconds) of each decoder fn(ids). `solo`: one prompt row at a time (batch
    1), the decoders taking turns on each prompt, so a drift of the machine's speed over minutes
    reaches every row alike; results joined (tokens stacked, forwards per prompt, seconds summed)."""
    if not solo:
        return {name: timed(lambda fn=fn: fn(ids)) for name, fn in fns.items()}
    runs: dict[str, list] = {name: [] for name in fns}
    for r in range(len(ids)):
        for name, fn in fns.items():
            runs[name].append(timed(lambda fn=fn, row=ids[r : r + 1]: fn(row)))
    joined = {}
    for name, pairs in runs.items():
        results, secs = zip(*pairs, strict=True)
        passes = sum(res.forward_passes for res in results) / len(results)
        joined[name] = Joined(torch.cat([res.tokens for res in results]), passes), sum(secs)
    return joined


def methods(args: argparse.Namespace, G: int) -> dict[str, dict]:
    """The issue's rows, plus a looser threshold and the factor rule with the dual cache, and the
    delayed cache (dual without the full refresh at each block start) at both thresholds."""
    base = {"gen_length": G, "steps": G, "block_length": args.block_length}
    tau, low, f = args.threshold, args.low_threshold, args.factor
    return {
        "vanilla": base,
        "prefix cache": {**base, "cache": "prefix"},
        "dual cache": {**base, "cache": "dual"},
        f"threshold {tau}": {**base, "threshold": tau},
        f"prefix cache + threshold {tau}": {**base, "cache": "prefix", "threshold": tau},
        f"dual cache + threshold {tau}": {**base, "cache": "dual", "threshold": tau},
        f"dual cache + threshold {low}": {**base, "cache": "dual", "threshold": low},
        f"dual cache + factor {f}": {**base, "cache": "dual", "factor": f},
        f"delayed cache + threshold {tau}": {**base, "cache": "delayed", "threshold": tau},
        f"delayed cache + threshold {low}": {**base, "cache": "delayed", "threshold": low},
    }


def bd3_methods(args: argparse.Namespace, G: int, K: int) -> dict[str, dict]:
    """Block diffusion: block-causal decoding in the model's blocks of K, exact KV cache; most
    confident first, or left to right (each block's leftmost masks; with a threshold, the sure
    leading run of them)."""
    base = {"gen_length": G, "steps": G, "block_length": K, "block_causal": True, "cache": "prefix"}
    tau, low = args.threshold, args.low_threshold
    ltr = {**base, "remasking": "left_to_right"}
    return {
        f"BD3 K={K} + cache": base,
        f"BD3 K={K} + cache + threshold {tau}": {**base, "threshold": tau},
        f"BD3 K={K} + cache + threshold {low}": {**base, "threshold": low},
        f"BD3 K={K} + cache + threshold {tau}, steps=0": {**base, "threshold": tau, "steps": 0},
        f"BD3 K={K} + cache, left to right": ltr,
        f"BD3 K={K} + cache, left to right + threshold {tau}": {**ltr, "threshold": tau, "steps": 0},
        f"BD3 K={K} + cache, left to right + threshold {low}": {**ltr, "threshold": low, "steps": 0},
    }


def diffusion_decoders(diff, args, G: int, only_vanilla: bool) -> dict:
    """name -> fn(ids) of the masked model's rows (vanilla on its first blocks with --vanilla-blocks)."""
    fns = {}
    for name, kw in methods(args, G).items():
        if args.bd3_only or (name != "vanilla" and (only_vanilla or name in args.skip)):
            continue
        cfg = SampleConfig(**kw)
        limit = args.vanilla_blocks if name == "vanilla" else None
        if limit is not None and limit * args.block_length < G:  # vanilla on its first blocks only
            n = limit * args.block_length
            cfg = _Truncated(dataclasses.replace(cfg, steps=n), n)
        fns[name] = lambda ids, cfg=cfg: generate(diff, ids, cfg)
    return fns


def bench_setting(diff, ar, tok, args, G: int, B: int, only_vanilla: bool, bd3=None) -> list[list[str]]:
    """The rows of one (gen length, batch) setting; `bd3` = (block-diffusion model, its K) adds its rows."""
    P = args.prompt_length
    ids = prompts(tok, args.solo_prompts if B == 1 else B, P).to(args.device)
    warm_up(diff, ar, ids[:B], args.block_length)
    fns = diffusion_decoders(diff, args, G, only_vanilla)
    bd3_names = []
    if bd3 is not None and not only_vanilla:
        model, K = bd3
        kept = {n: kw for n, kw in bd3_methods(args, G, K).items() if n not in args.skip}
        fns |= {n: lambda ids, kw=kw: generate(model, ids, SampleConfig(**kw)) for n, kw in kept.items()}
        bd3_names = list(kept)
    fns["AR (KV cache)"] = lambda ids: generate_ar(ar, ids, max_new_tokens=G)
    timings = time_all(fns, ids, solo=B < len(ids))
    rows, ref, base_tps, bd3_ref = [], None, None, None
    for name, (res, secs) in timings.items():
        if name in bd3_names or name == "AR (KV cache)":
            done, agree = G, None
            if name in bd3_names:
                bd3_ref = res.tokens if bd3_ref is None else bd3_ref
                agree = float((res.tokens[:, P:] == bd3_ref[:, P:]).float().mean())
        else:  # the masked model: vanilla first, the reference of `agree`
            done = int((res.tokens[:, P:] != diff.mask_token_id).all(0).long().cumprod(0).sum())
            if name == "vanilla":
                ref, ref_len, base_tps = res.tokens, done, len(ids) * done / secs
            agree = float((res.tokens[:, P : P + ref_len] == ref[:, P : P + ref_len]).float().mean())
        ppl = gen_ppl(ar, res.tokens, P, P + done)
        rows.append(_row(G, B, name, len(ids) * done / secs, base_tps, res.forward_passes, done, agree, ppl))
    ar_tps = float(rows[-1][3])
    for row in rows:  # tok/s as a multiple of the AR model's, measured in this setting
        row.insert(5, f"{float(row[3]) / ar_tps:.2f}x")
    return rows


def warm_up(diff, ar, ids: torch.Tensor, block: int) -> None:
    """One untimed block of each decoder, cached and not, so the first timed row (vanilla) does not
    pay the process's one-time costs (allocations, BLAS set-up) for the rows after it."""
    for cache in ("none", "dual"):
        generate(diff, ids, SampleConfig(gen_length=block, steps=block, block_length=block, cache=cache))
    generate_ar(ar, ids, max_new_tokens=block)


class _Truncated:
    """A SampleConfig view whose block sizes stop after n positions (vanilla timed on a prefix)."""

    def __init__(self, cfg: SampleConfig, n: int) -> None:
        self._cfg, self._n = cfg, n

    def __getattr__(self, name):
        return getattr(self._cfg, name)

    def block_sizes(self, total: int) -> list[int]:
        return self._cfg.block_sizes(min(total, self._n))


def _row(G, B, name, tps, base_tps, passes, done, agree, ppl) -> list[str]:
    speed = "-" if base_tps is None else f"{tps / base_tps:.1f}x"
    agree_s = "-" if agree is None else f"{100 * agree:.1f}%"
    per_forward = f"{done / passes:.2f}"
    return [
        str(G),
        str(B),
        name,
        f"{tps:.1f}",
        speed,
        f"{passes:g}" if float(passes).is_integer() else f"{passes:.1f}",
        str(done),
        per_forward,
        agree_s,
        f"{ppl:.2f}",
    ]


HEADER = [
    "gen",
    "batch",
    "method",
    "tok/s",
    "speedup",
    "vs AR",
    "forwards",
    "tokens/row",
    "tokens/forward",
    "agree",
    "gen-ppl",
]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def where(args: argparse.Namespace) -> str:
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(args.device))
    return f"CPU ({args.threads} threads)"


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    lengths = args.gen_lengths or (
        [64, 256] if args.vanilla_only else [64, 256] if args.quick else [256, 1024]
    )
    batches = args.batches or ([1, 4] if args.quick else [1, 16])
    size = (
        {"n_layer": 2, "n_head": 4, "n_embd": 64}
        if args.quick
        else {"n_layer": args.n_layer, "n_head": 4, "n_embd": args.n_embd}
    )
    block = args.prompt_length + max(lengths)
    if args.train_only:
        print(train_model(args.train_only, args, block, size))
        return 0
    diff_path = args.diffusion or train_model("masked_diffusion", args, block, size)
    ar_path = args.ar or train_model("autoregressive", args, block, size)
    diff, ar = load_pretrained(diff_path, args.device), load_pretrained(ar_path, args.device)
    bd3 = load_pretrained(args.bd3, args.device) if args.bd3 else None
    bd3_and_k = (bd3.model, bd3.config.diffusion.block_length) if bd3 else None
    tok = diff.tokenizer
    device_type = torch.device(args.device).type
    precision = (
        torch.autocast(device_type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )
    rows = []
    with torch.no_grad(), precision:
        for G in lengths:
            for B in batches:
                new = bench_setting(diff.model, ar.model, tok, args, G, B, args.vanilla_only, bd3_and_k)
                rows += new
                print(table(new), flush=True)
    n_params = sum(p.numel() for p in diff.model.parameters())
    mc = diff.model.config
    size = {"n_layer": mc.n_layer, "n_head": mc.n_head, "n_embd": mc.n_embd}  # of the model benchmarked
    head = (
        f"difflm sampling benchmark: {where(args)}, {args.precision}; diffusion{', BD3' if bd3 else ''} and AR "
        f"transformers of {n_params / 1e6:.2f}M params each ({size}), char-level Tiny Shakespeare; "
        f"prompt {args.prompt_length} chars, block length {args.block_length}, greedy; "
        f"vanilla blocks: {args.vanilla_blocks or 'all'}; gen-ppl judged by the AR model"
        + (f"; batch 1: {args.solo_prompts} prompts one at a time, forwards per prompt." if args.solo_prompts > 1 else ".")
    )
    text = head + "\n\n" + table(rows) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
