"""SGDD phase 1: reconstruction from the frozen encoder's vector, with and without verification.

    python benchmarks/sgdd.py --run scratch=runs/sgdd_scratch --run minilm=runs/sgdd_minilm \
        --out docs/results/sgdd [--grid 1:0,4:0,8:0,1:2,8:2,4:0:8] [--examples 500]
    python benchmarks/sgdd.py --merge OUT_A --merge OUT_B --out docs/results/sgdd

Each run folder is a finished `difflm train` SGDD run. For each run and each N:R[:S[:P[:F]]] of the
grid (N candidates kept by the encoder's cosine, R correction rounds, S edit-search rounds at most, P
the search's patience, default 3, F the fluency weight of the search's answer, default 0; 1:0 is
plain decoding) and each
CFG scale of --cfg (default: the run's own), the held-out sentences are decoded in 16 steps and scored: exact match, token
accuracy, BLEU, chrF, cosine(input, output), and the wall time per sentence at --batch-size. Plain
decoding is also timed at batch 1 (the latency a user sees). Settings that differ only in F share one
search (F only chooses among its texts): each row's time is the search's plus its own answer's. Writes results.json, table.md,
samples.md, curves.png and command.txt into --out. `--merge` combines the results.json of
earlier runs of this script (e.g. one process per decoder, run side by side) into one folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from difflm.config import system_config
from difflm.evaluate.sgdd import score
from difflm.evaluate.sgdd_decode import decode_vectors
from difflm.evaluate.sgdd_verify import FLUENCY_POOL, Verification, answer, fluency_pool, verified_search
from difflm.pretrained import Pretrained, load_pretrained
from difflm.systems.sgdd import SGDDSystemConfig, build_examples, load_encoder, split_examples


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=PATH", help="a finished run (repeat)")
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="DIR",
        help="an earlier --out folder or partial_NAME.json (repeat)",
    )
    p.add_argument("--out", required=True, help="results folder (e.g. docs/results/sgdd)")
    p.add_argument("--grid", default="1:0,4:0,8:0,1:2,8:2", help="N:R[:S] settings, comma-separated")
    p.add_argument(
        "--cfg", default=None, help="CFG scales to score each setting at, comma-separated (default: the run's)"
    )
    p.add_argument("--examples", type=int, default=500, help="held-out sentences scored")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--latency-sentences", type=int, default=50, help="sentences timed at batch 1 (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-minutes",
        action="append",
        default=[],
        metavar="NAME@STEPS=MIN",
        help="training wall time of that result when its log cannot tell it (a resumed run rewrites its log)",
    )
    return p.parse_args()


def given_minutes(results: list[dict], items: list[str]) -> None:
    """Apply --train-minutes NAME@STEPS=MIN to the matching results (`train_minutes_given` marks them)."""
    for item in items:
        key, _, minutes = item.partition("=")
        name, _, steps = key.partition("@")
        hits = [r for r in results if r["name"] == name and str(r["steps"]) == steps]
        if not hits or not minutes:
            raise SystemExit(f"--train-minutes {item!r}: no result {name} at step {steps} (use NAME@STEPS=MIN)")
        for r in hits:
            r["train_minutes"], r["train_minutes_given"] = float(minutes), True


def earlier_commands(where: Path, command: str) -> str:
    """A merged folder's command.txt (every command behind it, notes added by hand included), else
    the command its results.json names."""
    history = where / "command.txt"
    return history.read_text().rstrip("\n") if where.is_dir() and history.exists() else command


def val_curve(run: Path) -> list[tuple[int, float]]:
    records = [
        json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"val_loss"' in line
    ]
    return [(r["step"], r["val_loss"]) for r in records]


def training_minutes(run: Path) -> float:
    """The run's training wall time: its log's last `wall_s` (kept over resumes), or for runs
    logged before that field, from the log's creation to its last write (GNU `stat`, since
    Python's os.stat has no birth time on Linux; a resume rewrites the log, so this undercounts)."""
    log = run / "log.jsonl"
    walls = [json.loads(line)["wall_s"] for line in log.read_text().splitlines() if '"wall_s"' in line]
    if walls:
        return walls[-1] / 60
    born = float(
        subprocess.run(["stat", "-c", "%W", str(log)], capture_output=True, text=True, check=True).stdout
    )
    return (log.stat().st_mtime - born) / 60


def decode(
    pre: Pretrained, encoder, vectors: torch.Tensor, verify: Verification, weights: list[float], batch: int, seed: int, scale: float
) -> list[tuple[list[list[int]], float]]:
    """Outputs for every vector at CFG `scale`, one list per fluency weight of `weights` (`verify`'s
    own fluency unused), each with the seconds it took: the search, shared, once, plus that weight's
    own answer, which for a weight > 0 includes scoring the fluency pool (plain decoding: `weights`
    is [0.0])."""
    answers: list[list[list[int]]] = [[] for _ in weights]
    seconds = [0.0] * len(weights)
    for i in range(0, len(vectors), batch):
        gen = torch.Generator().manual_seed(seed)
        chunk, start = vectors[i : i + batch], time.perf_counter()
        if verify == Verification():
            answers[0] += decode_vectors(pre, chunk, cfg_scale=scale, generator=gen)
            seconds[0] += time.perf_counter() - start
            continue
        state = verified_search(pre, encoder, chunk, verify, cfg_scale=scale, generator=gen)
        searched, start = time.perf_counter() - start, time.perf_counter()
        pool = fluency_pool(pre, chunk, state) if any(weights) else None  # scored once for every weight
        pooled = time.perf_counter() - start
        for k, weight in enumerate(weights):
            start = time.perf_counter()
            answers[k] += answer(pre, chunk, state, weight, pool).as_lists()
            seconds[k] += searched + (pooled if weight else 0.0) + time.perf_counter() - start
    return list(zip(answers, seconds, strict=True))


def same_search(grid: list[Verification]) -> list[tuple[Verification, list[float]]]:
    """The grid's settings grouped by everything but the fluency weight (in order of first
    appearance), each with its weights: one search answers them all."""
    groups: dict[str, tuple[Verification, list[float]]] = {}
    for verify in grid:
        key = repr(dataclasses.replace(verify, fluency=0.0))
        groups.setdefault(key, (verify, []))[1].append(verify.fluency)
    return list(groups.values())


def evaluate_run(name: str, run: Path, grid: list[Verification], args: argparse.Namespace) -> dict:
    pre = load_pretrained(run)
    cfg = pre.config
    encoder = load_encoder(cfg.model.encoder)
    pairs = split_examples(cfg, "val")[: args.examples]
    data = build_examples(pairs, encoder, pre.tokenizer, cfg, 128)
    params = sum(p.numel() for p in {id(p): p for p in pre.model.parameters()}.values())
    result = {
        "name": name,
        "run": str(run),
        "decoder": cfg.model.decoder,
        "params": params,
        "bf16_mb": params * 2 / 2**20,
        "steps": int(pre.path.name.removeprefix("step-")),
        "train_minutes": training_minutes(run),
        "curve": val_curve(run),
        "settings": [],
        "samples": [],
    }
    own = system_config(cfg, SGDDSystemConfig).cfg_scale
    scales = [float(x) for x in args.cfg.split(",")] if args.cfg else [own]
    result["latency_ms_batch1"] = {}
    with torch.no_grad():
        for scale in sorted({*scales, own}) if args.latency_sentences else ():  # also with the run's own CFG
            [(_, latency)] = decode(pre, encoder, data.vectors[: args.latency_sentences], Verification(), [0.0], 1, args.seed, scale)
            result["latency_ms_batch1"][str(scale)] = 1000 * latency / min(args.latency_sentences, len(pairs))
        for scale, (verify, weights) in ((s, g) for s in scales for g in same_search(grid)):
            answers = decode(pre, encoder, data.vectors, verify, weights, args.batch_size, args.seed, scale)
            for weight, (outputs, seconds) in zip(weights, answers, strict=True):
                plan = {"N": verify.candidates, "R": verify.rounds, "S": verify.search, "P": verify.patience, "F": weight}
                plan |= {"pool": FLUENCY_POOL} if weight else {}
                metrics = score(pre, encoder, data.vectors, data, outputs)
                row = {"cfg": scale, **plan, **metrics, "ms_per_sentence": 1000 * seconds / len(pairs)}
                result["settings"].append(row)
                print(f"{name} cfg={scale} {plan}: {json.dumps(row)}", flush=True)
                firsts = zip(pairs[:8], outputs[:8], strict=True)
                result["samples"].append(
                    {"cfg": scale, **plan, "pairs": [(s, pre.tokenizer.decode(o)) for (s, _), o in firsts]}
                )
                (Path(args.out) / f"partial_{name}.json").write_text(json.dumps(result, indent=1))  # survives a kill
    return result


def parse_setting(item: str) -> Verification:
    """'N:R', 'N:R:S', 'N:R:S:P' or 'N:R:S:P:F' -> the verification it names (P: the search's
    patience, F: its fluency weight)."""
    parts = item.split(":")
    try:
        counts, fluency = [int(x) for x in parts[:4]], [float(x) for x in parts[4:]]
    except ValueError:
        counts = []
    if len(parts) not in (2, 3, 4, 5) or not counts:
        raise SystemExit(f"--grid item {item!r}: use N:R, N:R:S, N:R:S:P or N:R:S:P:F (F a number)")
    names = ("search", "patience", "fluency")
    extra = dict(zip(names, counts[2:] + fluency, strict=False))
    return Verification(candidates=counts[0], rounds=counts[1], **extra)


def table(results: list[dict]) -> str:
    lines = [
        "| decoder | params | train | CFG | N | R | S | P | F | EM % | token acc % | BLEU | chrF | cosine | ms/sentence (batch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        for row in res["settings"]:
            lines.append(
                f"| {res['name']} | {res['params'] / 1e6:.1f} M | {res['train_minutes']:.0f} min, {res['steps']} steps "
                f"| {row.get('cfg', 2.0):g} | {row['N']} | {row['R']} | {row.get('S', 0)} "
                f"| {patience(row)} | {fluency(row)} | {100 * row['exact_match']:.1f} "
                f"| {100 * row['token_acc']:.1f} | {row['bleu']:.1f} | {row['chrf']:.1f} | {row['cosine']:.3f} "
                f"| {row['ms_per_sentence']:.0f} |"
            )
    lines.append("")
    for res in results:
        latency = res["latency_ms_batch1"]
        for scale, ms in (latency if isinstance(latency, dict) else {"2.0": latency}).items():
            lines.append(
                f"- {res['name']}: plain decoding (16 steps, CFG {float(scale):g}) at batch 1: {ms:.0f} ms per sentence"
            )
    return "\n".join(lines) + "\n"


def patience(row: dict) -> str:
    """The search's patience ('-' without search; rows from before best-first search were greedy: 1)."""
    return str(row.get("P", 1)) if row.get("S", 0) else "-"


def fluency(row: dict) -> str:
    """The search's fluency weight and, after a slash, the closest texts it chose among ('-' without
    search; 0 for rows from before it existed; rows from before the pool was recorded chose among 16)."""
    if not row.get("S", 0):
        return "-"
    return f"{row['F']:g}/{row.get('pool', 16)}" if row.get("F", 0) else "0"


def samples(results: list[dict]) -> str:
    out = []
    for res in results:
        for block in res["samples"]:
            out.append(f"## {res['name']}, CFG {block.get('cfg', 2.0):g}, N={block['N']}, R={block['R']}, S={block.get('S', 0)}, P={patience(block)}, F={fluency(block)}\n")
            out += [f"- `{src}`\n  -> `{hyp}`" for src, hyp in block["pairs"]]
            out.append("")
    return "\n".join(out) + "\n"


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        steps, losses = zip(*res["curve"], strict=True)
        minutes = [s / res["steps"] * res["train_minutes"] for s in steps]
        ax.plot(minutes, losses, label=f"{res['name']} ({res['params'] / 1e6:.0f} M params)")
    ax.set_xlabel("training wall time (min, one core each)")
    ax.set_ylabel("held-out diffusion loss (nats/token)")
    ax.set_title("SGDD phase 1 on sentences_en")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if not args.run and not args.merge:
        raise SystemExit("give --run NAME=PATH (repeat) or --merge DIR (repeat)")
    grid = [parse_setting(item) for item in args.grid.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [
        evaluate_run(name, Path(path), grid, args) for name, _, path in (s.partition("=") for s in args.run)
    ]
    meta = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "eval_wall_minutes": (time.perf_counter() - start) / 60,
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32",
    }
    commands = []
    for where in args.merge:
        earlier = json.loads(
            (Path(where) / "results.json" if Path(where).is_dir() else Path(where)).read_text()
        )
        if "runs" not in earlier:  # a partial_NAME.json: one run, stopped before its last setting
            earlier = {"command": f"(partial: {where})", "runs": [earlier]}
        results += earlier["runs"]
        commands.append(earlier_commands(Path(where), earlier["command"]))
        meta.setdefault("merged", []).append({k: v for k, v in earlier.items() if k != "runs"})
    commands.append(meta["command"])
    given_minutes(results, args.train_minutes)
    (out / "results.json").write_text(json.dumps({**meta, "runs": results}, indent=1))
    (out / "table.md").write_text(table(results))
    (out / "samples.md").write_text(samples(results))
    (out / "command.txt").write_text("\n".join(commands) + "\n")
    plot_curves(results, out / "curves.png")
    print(table(results))


if __name__ == "__main__":
    main()
