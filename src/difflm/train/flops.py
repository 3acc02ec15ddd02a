"""Training FLOPs per token and a device's peak: the `tflops` and `mfu` of the training log.

nanoGPT's estimate (`model.py:estimate_mfu`, after PaLM's appendix B): a token costs 6N FLOPs in
the matmuls of the forward and backward pass through N weights, plus 12·L·H·Q·T for attention
(scores and weighted sums over T positions, in L layers of H heads of width Q). It ignores norms,
softmax and the embedding lookup (counted in N as if it were a matmul), so it is an estimate.
"""

from __future__ import annotations

from typing import Any

import torch

# bf16 dense tensor-core TFLOP/s of one GPU, matched as a substring of torch.cuda.get_device_name
# (in this order, so "L40S" is not read as "L4")
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def attention_shape(model_config: Any) -> tuple[int, int, int] | None:
    """(layers, heads, head width) read off a difflm or Hugging Face model config; None if unknown."""
    layers = _first(model_config, "n_layer", "num_hidden_layers")
    heads = _first(model_config, "n_head", "num_attention_heads")
    if not layers or not heads:
        return None
    width = _first(model_config, "n_embd", "hidden_size")
    head_dim = _first(model_config, "head_dim") or (width // heads if width else None)
    return (layers, heads, head_dim) if head_dim else None


def flops_per_token(shape: tuple[int, int, int], n_params: int, seq_len: int) -> int:
    """6N + 12·L·H·Q·T: training FLOPs of one token in a sequence of `seq_len`."""
    layers, heads, head_dim = shape
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """FLOP/s one device can do: `peak_tflops` when given, else the table's figure for a known CUDA
    GPU, else None (a CPU has no honest peak)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def _first(config: Any, *names: str) -> int | None:
    values = (getattr(config, name, None) for name in names)
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)
