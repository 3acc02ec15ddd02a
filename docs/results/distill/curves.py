"""Training curve of a distillation run: training loss (every 10 steps) and validation loss (every
100) on the AR model's greedy text, from the run's log. Writes NAME.png and NAME.json beside this
file (NAME: curves by default). Run from the repository root:

    python docs/results/distill/curves.py runs/distill/bd3_4
    python docs/results/distill/curves.py runs/distill/mdm mdm_curves
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
name = sys.argv[2] if len(sys.argv) > 2 else "curves"
records = [json.loads(line) for line in (Path(sys.argv[1]) / "log.jsonl").read_text().splitlines()]
train = [(r["step"], r["loss"]) for r in records if "loss" in r]
val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
(here / f"{name}.json").write_text(json.dumps({"train_loss": train, "val_loss": val}, indent=0))
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="train loss")
ax.plot(*zip(*val, strict=True), "o-", label="val loss")
ax.set_xlabel("step")
ax.set_ylabel("ELBO loss (nats/char, greedy text)")
ax.set_ylim(0, 2 * max(v for _, v in val))
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(here / f"{name}.png", dpi=120)
