"""Forward + backward time of PyTorch's scaled_dot_product_attention on the CPU, bf16 against float32.

    python benchmarks/attention.py               # 1 thread
    python benchmarks/attention.py --threads 2

Why `difflm.models.layers.sdpa` runs attention with narrow heads or few keys in float32 when
training on the CPU (`float32_attention`): under bf16 autocast the inputs arrive in bf16, and the
CPU flash-attention backward is much slower in bf16 than in float32 there, and not for wide heads
over many keys. Each row times the same q, k, v [B, H, L, D] (causal, and bidirectional for the two
shapes of benchmarks/train_step.py) in both dtypes, interleaved so machine noise hits them alike,
and prints the ratio bf16 / float32 measured in the same run; "float32 + casts" includes casting
bf16 inputs up and the output back down (the core transformer's RoPE writes q and k in float32
directly, so it pays only v's and the output's casts). The last column is the path `sdpa` takes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from difflm.models.layers import float32_attention

# [B, H, L, D]: the two shapes of benchmarks/train_step.py first, then keys and head dims around the limits
SHAPES = [
    (16, 6, 256, 64),
    (32, 4, 128, 32),
    (32, 4, 256, 32),
    (32, 4, 128, 64),
    (16, 6, 256, 128),
    (8, 6, 512, 64),
    (8, 6, 512, 32),
]
TRAIN_STEP_SHAPES = SHAPES[:2]


def step(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, causal: bool, upcast: bool) -> float:
    """Seconds for one forward + backward; `upcast`: bf16 inputs cast to float32 and back."""
    start = time.perf_counter()
    a, b, c = (x.float() for x in (q, k, v)) if upcast else (q, k, v)
    y = F.scaled_dot_product_attention(a, b, c, is_causal=causal)
    (y.to(grad.dtype) if upcast else y).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| B, H, L, D | attention | bf16 ms | float32 ms | float32 + casts ms | bf16 / (float32 + casts) "
          "| sdpa runs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        for causal in (True, False) if shape in TRAIN_STEP_SHAPES else (True,):
            base = [torch.randn(shape) for _ in range(4)]
            setups = {
                "bf16": ([x.bfloat16().requires_grad_() for x in base[:3]], base[3].bfloat16(), False),
                "fp32": ([x.clone().requires_grad_() for x in base[:3]], base[3], False),
                "cast": ([x.bfloat16().requires_grad_() for x in base[:3]], base[3].bfloat16(), True),
            }
            times: dict[str, list[float]] = {key: [] for key in setups}
            for i in range(args.repeats + 2):
                for key, (qkv, grad, upcast) in setups.items():
                    seconds = step(*qkv, grad, causal, upcast)
                    if i >= 2:  # the first two calls warm up
                        times[key].append(seconds)
            ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
            kind = "causal" if causal else "bidirectional"
            path = "float32" if float32_attention(setups["bf16"][0][0], shape[2]) else "bf16"
            shape_text = ", ".join(map(str, shape))
            print(f"| {shape_text} | {kind} | {ms['bf16']:.1f} | {ms['fp32']:.1f} | {ms['cast']:.1f} "
                  f"| {ms['bf16'] / ms['cast']:.2f}x | {path} |")


if __name__ == "__main__":
    main()
