"""FSDP2 for `train.strategy=fsdp` under torchrun: parameters, gradients and optimizer state
sharded across processes, with sharded checkpoints that resume exactly.

`shard_model` applies torch's `fully_shard` to every layer of each `nn.ModuleList` (a
transformer's blocks) and then to the root, so one layer's full weights exist at a time. The
optimizer is built afterwards on the sharded parameters (DTensors), so its state is sharded too.

A checkpoint keeps today's step folder, so sample / eval / serve read an FSDP run like any other:
rank 0 writes `model.safetensors` (the full weights, gathered onto its CPU), and every rank writes
`fsdp-shard-{rank}-of-{world}.safetensors`: its local parameter shards and optimizer state (the
parameter groups and scalars in the metadata, as `optimizer.safetensors` does). Resuming reads each
rank's own shard back, so it needs the same number of processes; the noise and data order are
functions of (seed, step) as always, so the resumed run is bit-identical to an uninterrupted one.
On several nodes the output folder must be on a shared filesystem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from difflm.errors import DifflmError
from difflm.train import checkpoint as ckpt


def shard_model(model: nn.Module) -> nn.Module:
    """fully_shard each layer of every ModuleList, then the root (in place; returns the model)."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_value(t: Tensor) -> float:
    """A scalar that may be a DTensor (e.g. clip_grad_norm_'s total norm over sharded grads)."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def _local(t: Tensor) -> Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().contiguous().cpu()


def shard_file(rank: int, world: int) -> str:
    return f"fsdp-shard-{rank}-of-{world}.safetensors"


def _shard_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's tensors (model under `model.`, optimizer under `optim.{idx}.`) and metadata."""
    tensors, seen = {}, set()
    for name, value in model.state_dict().items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.data_ptr() in seen:  # a tied weight: stored once, under its first name
            continue
        seen.add(local.data_ptr())
        tensors[f"model.{name}"] = _local(value)
    state = optimizer.state_dict()
    scalars = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = _local(value)
            else:
                scalars[f"{idx}.{name}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def save_sharded(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    build: Any,
    run_config: dict,
    trainer_state: dict,
    tokenizer: Any = None,
    keep_last: int = 0,
) -> None:
    """Every rank calls this: shards to a staging folder, the full weights gathered to rank 0,
    which writes the step folder (atomically, shards included). `build()` makes the model
    (called on the meta device, to hold the gathered weights without a second copy)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    staging = ckpt.checkpoints_dir(output_dir) / f".fsdp-step-{step}"
    staging.mkdir(parents=True, exist_ok=True)
    tensors, meta = _shard_tensors(model, optimizer)
    save_file(tensors, str(staging / shard_file(rank, world)), metadata=meta)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dist.barrier()  # every shard is on disk
    if rank == 0:
        with torch.device("meta"):
            holder = build()
        own: dict[int, Tensor] = {}  # gathered tensors may be views of one buffer: own copies (tied once)
        holder.load_state_dict({k: own.setdefault(id(v), v.clone()) for k, v in full.items()}, assign=True)
        ckpt.save_checkpoint(
            output_dir,
            step,
            model=holder,
            run_config=run_config,
            trainer_state=trainer_state,
            tokenizer=tokenizer,
            keep_last=keep_last,
            extra_files=[staging / shard_file(r, world) for r in range(world)],
        )
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load this rank's shard of `path` into the sharded model and its optimizer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    file = path / shard_file(rank, world)
    if not file.is_file():
        raise DifflmError(
            f"'{path}' has no {file.name}: resume an FSDP run with the number of processes it was saved "
            "with (or a DDP run with train.strategy=ddp)"
        )
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError) as err:
        raise DifflmError(f"cannot read '{file}': {err}") from None
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if f"model.{name}" in tensors:
                target = value.to_local() if isinstance(value, DTensor) else value
                target.copy_(tensors[f"model.{name}"])
    optimizer.load_state_dict(_optimizer_state(optimizer, tensors, meta))


def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> dict:
    """The optimizer state dict, local shards wrapped back as DTensors like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        idx, name = key[len("optim.") :].split(".", 1)
        param = params[int(idx)]
        if isinstance(param, DTensor) and value.dim() > 0:
            value = DTensor.from_local(
                value.to(param.device),
                param.device_mesh,
                param.placements,
                shape=param.shape,
                stride=param.stride(),
                run_check=False,
            )
        state.setdefault(int(idx), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}
