"""AR -> diffusion with a Qwen3-shaped model: the table, curves and samples of the runs that
examples/qwen3_ar_to_diffusion.sh trains.

    python benchmarks/qwen3_ar_to_diffusion.py OUT [--results docs/results/qwen3_ar_to_diffusion]

OUT holds the runs `ar` (the causal Qwen3), `from_ar` (Qwen3-LLaDA from its converted weights),
`scratch` (the same Qwen3-LLaDA from random init) and, when present, `from_ar_block` (from the
converted weights under block attention). For each: the validation loss from `difflm eval`'s
evaluator on the whole validation split (AR: next-token NLL; diffusion: the ELBO bound with full
attention, nats/token), its validation curve, and for the diffusion runs the first step at which
the curve reaches the bound scratch ends at. Samples come from `difflm sample`. Writes
results.json, table.md, samples.md, curves.png and command.txt into --results.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from difflm.evaluate.options import EvalOptions
from difflm.pretrained import load_pretrained
from difflm.systems.registry import get_system, resolve

RUNS = {
    "ar": "causal Qwen3, next-token NLL",
    "from_ar": "Qwen3-LLaDA from the converted AR model (ELBO bound)",
    "scratch": "Qwen3-LLaDA from random init (ELBO bound)",
    "from_ar_block": "Qwen3-LLaDA from the converted AR model, block attention in training (ELBO bound)",
}
PROMPT = "The game"


def val_curve(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def evaluate(run: Path, samples: int, device: str) -> dict:
    """The system's own evaluator (`difflm eval`) on the whole validation split, of the run's best
    checkpoint when it kept one (the AR checkpoint that was converted), else its last."""
    best = run / "checkpoints" / "best"
    pre = load_pretrained(best if best.is_dir() else run, device)
    metrics = resolve(get_system(pre.config.task).evaluate)(pre, EvalOptions(samples=samples))
    loss = metrics.get("val_elbo_nll", metrics.get("val_loss"))  # diffusion: the bound; AR: the NLL
    return {"val_loss": loss, "steps": json.loads((pre.path / "trainer_state.json").read_text())["step"]}


def sample(run: Path, name: str, length: int, device: str) -> str:
    """AR at temperature 0.8; diffusion one token per step, blocks of 32 one after another."""
    block = str(min(32, length))
    flags = ["--temperature", "0.8"] if name == "ar" else ["--steps", str(length), "--block-length", block]
    cmd = [sys.executable, "-m", "difflm.cli", "sample", str(run), "--prompt", PROMPT, "--gen-length",
           str(length), "--seed", "0", "--device", device, "--json", *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[0])["completion"]


def first_step_at(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((step for step, loss in curve if loss <= level), None)


def table(results: dict[str, dict], target: float) -> str:
    lines = [
        "| run | steps | val loss (nats/token) | first eval at or below scratch's last curve point |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        reach = "-" if name == "ar" else str(first_step_at(r["curve"], target) or "not reached")
        lines.append(f"| {name}: {RUNS[name]} | {r['steps']} | {r['val_loss']:.3f} | {reach} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{name}: {RUNS[name]}", marker="." if name == "ar" else None)
    ax.set_xlabel("training step (AR: pretraining; others: diffusion)")
    ax.set_ylabel("val loss, nats/token (diffusion: ELBO bound)")
    ax.set_title("WikiText-2, Qwen3 4x128: AR -> diffusion vs diffusion from scratch")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="the OUT folder of examples/qwen3_ar_to_diffusion.sh")
    p.add_argument("--results", default="docs/results/qwen3_ar_to_diffusion")
    p.add_argument("--samples", type=int, default=4, help="Monte-Carlo draws of t per sequence (ELBO)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens of each sample")
    p.add_argument("--device", default="cpu", help="where the models are evaluated and sampled (cpu, cuda)")
    args = p.parse_args()
    start, root, out = time.perf_counter(), Path(args.runs), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in RUNS:
        if (root / name).is_dir():
            scores = evaluate(root / name, args.samples, args.device)
            results[name] = {**scores, "curve": val_curve(root / name)}
            results[name]["sample"] = sample(root / name, name, args.gen_length, args.device)
            print(f"{name}: val {results[name]['val_loss']:.3f}", flush=True)
    target = results["scratch"]["curve"][-1][1]  # the curves' own measure (the trainer's val batches)
    (out / "table.md").write_text(table(results, target))
    plot(results, out / "curves.png")
    samples = [f"## {name}\n\n```\n{PROMPT}{r['sample']}\n```\n" for name, r in results.items()]
    (out / "samples.md").write_text("\n".join(samples))
    meta = {
        "seconds": round(time.perf_counter() - start, 1),
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
    }
    (out / "results.json").write_text(json.dumps({"runs": results, **meta}, indent=1) + "\n")
    (out / "command.txt").write_text(shlex.join(["python", *sys.argv]) + "\n")
    print(table(results, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
