"""Diffusion Forcing ablation: which settings make DF's one-step next-token NLL fall below the
letter-frequency level (~3.3 nats/char on Tiny Shakespeare) at CPU scale.

    python benchmarks/forcing_ablation.py --out docs/results/forcing_ablation --steps 600 \
        --variant base= --variant rw4=model.gaussian.rounding_weight=4 \
        --variant pred_v=model.gaussian.objective=pred_v

Each variant is `NAME=OVERRIDE[,OVERRIDE...]` on top of recipes/shakespeare_char_df.yaml and the
shared `--base` overrides (a small DFGPT sized for one CPU core). Variants train one after another
(`difflm train`, one process each, logs beside the runs) and a variant whose run already holds its
last step is not retrained, so an interrupted sweep resumes where it stopped. For every variant:
the next-token NLL (the last character of each validation block from pure noise in one step, its
clean past as context), the rounding NLL at level 0, wall time and the training curve. Writes
results.json (every figure), table.md and command.txt into --out after each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from difflm.data.blocks import text_blocks
from difflm.evaluate.forcing import next_token_nll, rounding_nll
from difflm.pretrained import load_pretrained

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shakespeare_char_df.yaml"
BASE = (
    "model.n_layer=4 model.n_head=4 model.n_embd=128 model.dropout=0.0 data.block_size=128 "
    "train.batch_size=32 train.lr=2e-3 train.min_lr=2e-4 train.warmup_steps=50 train.precision=fp32 "
    "train.eval_every=100 train.eval_batches=10 train.save_every=100 train.keep_last=1 train.progress=false"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every variant")
    p.add_argument("--base", default=BASE, help="overrides every variant shares")
    p.add_argument("--work-dir", default="runs/forcing_ablation", help="run folders and logs")
    p.add_argument("--out", default="runs/forcing_ablation/results", help="results folder")
    p.add_argument("--max-batches", type=int, default=None, help="val batches scored (default: all)")
    return p.parse_args()


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, _, overrides = spec.partition("=")
    if not name:
        raise SystemExit(f"error: variant {spec!r} needs a name: NAME=OVERRIDE[,OVERRIDE...]")
    return name, [o for o in overrides.split(",") if o]


def train_command(run_dir: Path, overrides: list[str], args: argparse.Namespace) -> list[str]:
    return [
        "difflm", "train", str(RECIPE), *shlex.split(args.base), *overrides,
        f"train.max_steps={args.steps}", f"train.output_dir={run_dir}",
    ]  # fmt: skip


def finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{steps}").is_dir()


def curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    return [{"step": r["step"], "val_loss": r["val_loss"]} for r in records if "val_loss" in r]


def measure(run_dir: Path, max_batches: int | None) -> dict[str, float]:
    pre = load_pretrained(str(run_dir), "cpu")
    _, _, val = text_blocks(pre.config.data, pre.tokenizer)
    return {
        "next_token_nll": next_token_nll(pre.model, val, batch_size=64, max_batches=max_batches),
        "rounding_nll_clean": rounding_nll(pre.model, val, 0, batch_size=64, max_batches=max_batches),
    }


def run_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    run_dir = Path(args.work_dir) / name
    command = train_command(run_dir, overrides, args)
    wall = None
    if not finished(run_dir, args.steps):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(run_dir.parent / f"{name}.log", "w") as log:
            subprocess.run(
                [*command, "train.overwrite=true"], stdout=log, stderr=subprocess.STDOUT, check=True
            )
        wall = time.perf_counter() - start
    return {
        "overrides": overrides,
        "command": shlex.join(command),
        "train_wall_s": wall,
        **measure(run_dir, args.max_batches),
        "curve": curve(run_dir),
    }


def write(out: Path, results: dict, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "steps": args.steps,
        "base": args.base,
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "variants": results}, indent=2) + "\n")
    rows = ["| variant | overrides | next-token NLL (1 step) | rounding NLL (level 0) | train wall (s) |"]
    rows.append("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        wall = f"{r['train_wall_s']:.0f}" if r["train_wall_s"] else "-"
        rows.append(
            f"| {name} | {' '.join(r['overrides']) or '(recipe)'} | {r['next_token_nll']:.3f} | "
            f"{r['rounding_nll_clean']:.3f} | {wall} |"
        )
    (out / "table.md").write_text("\n".join(rows) + "\n")
    (out / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")
    print("\n".join(rows), flush=True)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    previous = out / "results.json"
    results = json.loads(previous.read_text())["variants"] if previous.exists() else {}
    for spec in args.variant:
        name, overrides = parse_variant(spec)
        result = run_variant(name, overrides, args)
        if result["train_wall_s"] is None and name in results:  # reused: keep the measured wall time
            result["train_wall_s"] = results[name]["train_wall_s"]
        results[name] = result
        write(out, results, args)


if __name__ == "__main__":
    main()
