"""Teacher Forcing vs Diffusion Forcing on the same DFGPT: one side-by-side table and a bar plot.

Either compare two trained checkpoints:

    python benchmarks/forcing_vs_teacher.py --tf runs/tf --df runs/df --plot forcing_vs_teacher.png

or train both small in-process first (same size, same steps, same data), then compare:

    python benchmarks/forcing_vs_teacher.py --train-small --data shakespeare \
        --steps 200 --out /tmp/fvt_small

The TF checkpoint judges the continuations of both (gen_ppl).  DF sampling settings default to the
checkpoint's `system` section; --schedule / --horizon / --sampling-timesteps override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from difflm.config import load_config, system_config
from difflm.evaluate.forcing import ContinuationConfig, forcing_metrics
from difflm.pretrained import Pretrained, load_pretrained
from difflm.systems.forcing import ForcingSystemConfig
from difflm.systems.registry import build_run
from difflm.train.trainer import train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = [
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_embd=128",
    "model.dropout=0.0",
    "data.block_size=128",
    "train.batch_size=32",
    "train.precision=bf16",
    "train.eval_every=0",
    "train.eval_batches=4",
    "train.progress=false",
]
ROWS = [  # (metric key, label); a metric a system lacks is shown as "-"
    ("params", "parameters"),
    ("steps", "train steps"),
    ("val_loss", "val loss TF (nats/char)"),
    ("rounding_nll_clean", "rounding NLL DF, level 0"),
    ("rounding_nll_stab", "rounding NLL DF, stab. level"),
    ("next_token_nll", "next-token NLL DF, 1 step"),
    ("gen_ppl", "gen-ppl (TF judge)"),
    ("bleu", "BLEU vs held-out"),
    ("chrf", "chrF vs held-out"),
    ("tokens_per_s", "sampling tokens/s"),
]


def train_small(args: argparse.Namespace) -> tuple[Path, Path]:
    """Train TF and DF with identical size, data, steps and seed; returns their run folders."""
    dirs = []
    for name in ("tf", "df"):
        out = Path(args.out) / name
        extra = [f"data.path={args.data}", f"train.max_steps={args.steps}", f"train.save_every={args.steps}"]
        cfg = load_config(
            RECIPES / f"shakespeare_char_{name}.yaml", [*SMALL, *extra, f"train.output_dir={out}"]
        )
        start = time.perf_counter()
        state = train(cfg, build_run(cfg))
        print(
            f"trained {name}: {state.step} steps in {time.perf_counter() - start:.0f}s, val {state.val_loss:.4f}"
        )
        dirs.append(out)
    return dirs[0], dirs[1]


def sampler_settings(pre: Pretrained, args: argparse.Namespace) -> ForcingSystemConfig:
    system = system_config(pre.config, ForcingSystemConfig)
    changes = {
        "schedule": args.schedule,
        "horizon": args.horizon,
        "sampling_timesteps": args.sampling_timesteps,
    }
    return dataclasses.replace(system, **{k: v for k, v in changes.items() if v is not None})


def measure(pre: Pretrained, judge: Pretrained, args: argparse.Namespace) -> dict:
    continuations = ContinuationConfig(
        n_prompts=args.continuations,
        prompt_length=args.prompt_length,
        gen_length=args.gen_length,
        seed=args.seed,
    )
    metrics = forcing_metrics(
        pre,
        judge=judge,
        continuations=continuations,
        system=sampler_settings(pre, args) if pre.model.config.use_diffusion_forcing else None,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        seed=args.seed,
    )
    steps = json.loads((pre.path / "trainer_state.json").read_text())["step"]
    return {"params": sum(p.numel() for p in pre.model.parameters()), "steps": steps, **metrics}


def table(results: dict[str, dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:,}" if isinstance(value, int) else f"{value:.3f}"

    lines = [
        f"| {'metric':<30} | {'teacher forcing':>16} | {'diffusion forcing':>17} |",
        f"|{'-' * 32}|{'-' * 18}|{'-' * 19}|",
    ]
    for key, label in ROWS:
        tf, df = (cell(results[name].get(key)) for name in ("teacher forcing", "diffusion forcing"))
        lines.append(f"| {label:<30} | {tf:>16} | {df:>17} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("gen_ppl", "gen-ppl (lower is better)"),
        ("chrf", "chrF"),
        ("bleu", "BLEU"),
        ("tokens_per_s", "tokens/s"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    names = list(results)
    for ax, (key, title) in zip(axes, keys, strict=True):
        ax.bar(names, [results[n].get(key) or 0.0 for n in names], color=["tab:blue", "tab:orange"])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle("Teacher Forcing vs Diffusion Forcing (same DFGPT)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf", help="teacher_forcing checkpoint (also the judge)")
    parser.add_argument("--df", help="diffusion_forcing checkpoint")
    parser.add_argument("--train-small", action="store_true", help="train both small in-process first")
    parser.add_argument("--data", default="shakespeare", help="corpus for --train-small")
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps of each system (--train-small)"
    )
    parser.add_argument("--out", default="runs/forcing_vs_teacher", help="run folders of --train-small")
    parser.add_argument("--continuations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--schedule", default=None)
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--sampling-timesteps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--plot", default="forcing_vs_teacher.png")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--table", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args()
    if args.train_small:
        args.tf, args.df = map(str, train_small(args))
    if not (args.tf and args.df):
        parser.error("give --tf and --df checkpoints, or --train-small")
    tf, df = load_pretrained(args.tf, args.device), load_pretrained(args.df, args.device)
    results = {"teacher forcing": measure(tf, tf, args), "diffusion forcing": measure(df, tf, args)}
    print(table(results))
    if args.table:
        Path(args.table).write_text(table(results) + "\n")
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
