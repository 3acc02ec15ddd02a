"""One forward pass for every batch in flight: continuous batching across settings and arrivals.

Each engine batch (a cohort: one model, one set of sampling settings) runs `generate_steps` on its
own worker thread, calling a `FusedModel` instead of the model. Its forward hands the call to the
`Fuser` and blocks. When every worker is blocked (or done), the fuser runs all pending calls as
ONE forward of the real model (rows left padded to the longest, padding hidden by the key bias,
the packed `logits_at` outputs split back), then wakes the workers. So a request that arrives
while others run joins the very next forward pass, whatever its settings, and a finished batch
simply stops calling. RoPE makes the left shift invisible to the maths; numerically the padded
forward differs in rounding only, which float64 serving makes irrelevant to the argmax.

Calls that cannot share a pass (a KV-cache step, a full attention bias, extra keywords, a model
with learned absolute positions) still go through the fuser, one at a time, so the model is only
ever run by the fuser's thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from difflm.models.protocol import Denoiser, check_denoiser


def can_fuse(model: Denoiser) -> bool:
    """A denoiser that projects packed positions and takes cache keywords, with relative positions."""
    config = getattr(model, "config", None)
    packed_and_cached = check_denoiser(model).supports_logits_at and model.supports_kv_cache
    return packed_and_cached and not getattr(config, "learned_positions", False)


@dataclass(eq=False)  # compared by identity
class _Call:
    input_ids: Tensor
    kwargs: dict
    result: Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    def fusable(self) -> bool:
        bias = self.kwargs.get("attention_bias")
        keys = set(self.kwargs) - {"attention_bias", "logits_at"}
        return (
            not keys
            and self.kwargs.get("logits_at") is not None
            and (bias is None or (bias.dim() == 4 and bias.shape[1] == 1 and bias.shape[2] == 1))
        )


@dataclass
class Fuser:
    """Collects forward calls from worker threads and runs them together on one thread."""

    model: nn.Module
    cv: threading.Condition
    busy: int = 0  # workers computing between forwards (neither blocked here nor done)
    pending: list[_Call] = field(default_factory=list)
    passes: int = 0  # real forward passes run

    def call(self, input_ids: Tensor, kwargs: dict) -> Tensor:
        """From a worker: queue the call, block until the fuser has run it."""
        item = _Call(input_ids, kwargs)
        with self.cv:
            self.pending.append(item)
            self.busy -= 1
            self.cv.notify_all()
            self.cv.wait_for(lambda: item.done)
        if item.error is not None:
            raise item.error
        return item.result

    def abandon(self, err: BaseException) -> None:
        """Under cv: fail every pending call (the server is stopping)."""
        for c in self.pending:
            c.error, c.done = err, True
        self.pending = []

    def ready(self) -> bool:
        """Under cv: every live worker is waiting here."""
        return bool(self.pending) and self.busy == 0

    def run_pending(self) -> None:
        """On the fuser's thread (cv held by the caller on entry and exit)."""
        calls, self.pending = self.pending, []
        self.cv.release()
        try:
            with torch.no_grad():
                fused = [c for c in calls if c.fusable()] if can_fuse(self.model) else []
                if fused:
                    self._run_fused(fused)
                for c in calls:
                    if c not in fused:
                        self._run_one(c)
        finally:
            self.cv.acquire()
        for c in calls:
            c.done = True
        self.busy += len(calls)  # the woken workers compute again
        self.cv.notify_all()

    def _run_one(self, c: _Call) -> None:
        try:
            c.result = self.model(c.input_ids, **c.kwargs)
            self.passes += 1
        except Exception as err:  # noqa: BLE001 - handed to the worker, which fails its batch
            c.error = err

    def _run_fused(self, calls: list[_Call]) -> None:
        try:
            ids, bias, at = _stack(calls)
            out = self.model(ids, attention_bias=bias, logits_at=at)  # [N, V] packed, row-major
            self.passes += 1
        except Exception as err:  # noqa: BLE001
            for c in calls:
                c.error = err
            return
        sizes = [int(c.kwargs["logits_at"].sum()) for c in calls]
        for c, part in zip(calls, out.split(sizes), strict=True):
            c.result = part


def _stack(calls: list[_Call]) -> tuple[Tensor, Tensor | None, Tensor]:
    """Left-pad every call's rows to the longest: ids, key bias [N, 1, 1, L] (None when nothing is
    hidden) and logits_at [N, L]."""
    width = max(c.input_ids.shape[1] for c in calls)
    ids, keys, ats = [], [], []
    for c in calls:
        b, L = c.input_ids.shape
        pad = width - L
        ids.append(nn.functional.pad(c.input_ids, (pad, 0)))
        ats.append(nn.functional.pad(c.kwargs["logits_at"].bool(), (pad, 0)))
        own = c.kwargs.get("attention_bias")
        own = (
            torch.zeros(b, 1, 1, L, device=c.input_ids.device)
            if own is None
            else own.float().expand(b, 1, 1, L)
        )
        keys.append(nn.functional.pad(own, (pad, 0), value=float("-inf")))
    bias = torch.cat(keys)
    return torch.cat(ids), (None if bool((bias == 0).all()) else bias), torch.cat(ats)


class FusedModel(nn.Module):
    """What a worker's engine sees: the model's protocol, every forward routed through the fuser."""

    supports_kv_cache = True
    supports_logits_at = True

    def __init__(self, fuser: Fuser) -> None:
        super().__init__()
        self.inner = fuser.model  # parameters() / config for the engine's cache and dtype checks
        self.config = fuser.model.config
        self.mask_token_id = fuser.model.mask_token_id
        self.max_length = fuser.model.max_length
        self.logits_shift = fuser.model.logits_shift
        self._fuser = fuser

    def forward(
        self,
        input_ids: Tensor,
        attention_bias: Tensor | None = None,
        logits_at: Tensor | None = None,
        position_offset: int = 0,
        kv_cache: Any = None,
        attend_len: int | None = None,
    ) -> Tensor:
        kwargs = {"attention_bias": attention_bias, "logits_at": logits_at}
        if kv_cache is not None:
            kwargs.update(position_offset=position_offset, kv_cache=kv_cache, attend_len=attend_len)
        return self._fuser.call(input_ids, kwargs)
