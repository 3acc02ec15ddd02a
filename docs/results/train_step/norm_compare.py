"""Forward + backward of one norm over a training step's activations: LayerNorm against RMSNorm.

    python docs/results/train_step/norm_compare.py [--before FILE]

FILE: an earlier `src/difflm/models/layers.py` (e.g. `git show 53a3181:src/difflm/models/layers.py`),
whose RMSNorm joins the table. One thread, freed memory kept (as the trainer does), fp32; the norms
take turns, seven times 20 calls each; the table gives the median of the seven medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from difflm.models.layers import RMSNorm
from difflm.train.allocator import keep_freed_memory

SHAPES = ((4096, 128), (4096, 384))  # a 4x128 step's [32 x 128, C] and a 6x384 step's [16 x 256, C]


def load_rms_norm(path: str) -> type[torch.nn.Module]:
    spec = importlib.util.spec_from_file_location("layers_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["layers_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.RMSNorm


def median_ms(norm: torch.nn.Module, x0: torch.Tensor, grad: torch.Tensor, calls: int = 20) -> float:
    times = []
    for _ in range(calls):
        x = x0.clone().requires_grad_(True)
        start = time.perf_counter()
        norm(x).backward(grad)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="an earlier layers.py whose RMSNorm to time as well")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| norm, forward + backward (ms) | " + " | ".join(f"[{n}, {c}]" for n, c in SHAPES) + " |")
    print("| --- |" + " --- |" * len(SHAPES))
    rows: dict[str, list[float]] = {}
    for n, c in SHAPES:
        norms = {"LayerNorm (fused)": torch.nn.LayerNorm(c, bias=False), "RMSNorm": RMSNorm(c)}
        if args.before:
            norms["RMSNorm before"] = load_rms_norm(args.before)(c)
        x0, grad = torch.randn(n, c), torch.randn(n, c)
        runs: dict[str, list[float]] = {name: [] for name in norms}
        for _ in range(7):
            for name, norm in norms.items():
                runs[name].append(median_ms(norm, x0, grad))
        for name, times in runs.items():
            rows.setdefault(name, []).append(statistics.median(times))
    for name, times in rows.items():
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
