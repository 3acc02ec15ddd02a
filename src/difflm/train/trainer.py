"""The one training loop, shared by every system.

A system supplies a `Run` (model, objective, datasets, tokenizer); the loop knows nothing of diffusion.
Each step draws the global batch in a seeded per-epoch order, lets the objective corrupt it with a
generator seeded from (seed, step), then each process takes its slice and each micro-batch its
share. Because nothing random depends on history, resuming at step N replays exactly what an
uninterrupted run would have done, and 2 processes see the same noise as 1 (DDP parity).

fp16 autocast gets a dynamic loss scale (torch.amp.GradScaler): without it small gradients
underflow to zero in half precision. Its state lives in trainer_state.json, so resuming stays exact.

Habits of nanoGPT and MDLM: `train.ema` keeps an average of the weights (train/ema.py) that
validation and the inference weights use; `train.keep_best` writes checkpoints/best/ whenever the
periodic val loss improves and `train.patience` stops a run that has stopped improving (the best
loss and the evaluations since it live in TrainState, so a resumed run counts on exactly);
`train.compile` compiles the model for the step; the log carries achieved `tflops` and, where the
device's peak is known, `mfu` (train/flops.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from difflm.config import DEVICE_NAMES, RunConfig, TrainConfig, model_family, to_dict
from difflm.data.packing import batch_order, length_grouped_order
from difflm.errors import DifflmError
from difflm.models import build_model
from difflm.train import allocator, flops, fsdp, lora
from difflm.train import checkpoint as ckpt
from difflm.train.ema import EMA
from difflm.train.optim import build_optimizer, get_lr, set_lr
from difflm.train.run_folder import StopSignals, TrainingInterrupted, claim_output_dir, trim_log

Batch = dict[str, Tensor]


class Objective(Protocol):
    """What a system trains: how a batch is corrupted and how the loss is computed."""

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]: ...


@dataclass
class Run:
    model: nn.Module
    objective: Objective
    train_data: Any  # map-style: __len__, __getitem__ -> Tensor or dict of Tensors
    val_data: Any
    tokenizer: Any = None


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    val_loss: float | None = None
    best_val_loss: float | None = None  # the lowest periodic val loss so far (train.keep_best, patience)
    evals_since_best: int = 0  # periodic evaluations since it
    grad_scaler: dict | None = None  # fp16's GradScaler state (scale, growth tracker), else None
    wall_seconds: float = 0.0  # training wall time so far (steps, evaluations, saves), over every resume


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """'auto', 'cpu', 'mps', 'cuda' or 'cuda:N' -> a device that exists here (else a DifflmError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICE_NAMES, name):
        raise DifflmError(f"{what}={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DifflmError(
                f"{what}={name} but this machine has {torch.cuda.device_count()} CUDA devices; use cpu"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DifflmError(f"{what}=mps but no Apple GPU is available; use cpu")
    return torch.device(name)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of one step: a function of (seed, step) only, never of history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def collate(items: list) -> Batch:
    if torch.is_tensor(items[0]):
        return {"input_ids": torch.stack(items)}
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def split_batch(batch: Batch, parts: int, index: int) -> Batch:
    return {k: v.chunk(parts)[index] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


class Logger:
    """Console (through tqdm), a JSONL file, and tensorboard / wandb when asked for and installed."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, run_config: dict, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.sinks: list = []
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "log.jsonl", "a")
        for name in cfg.log_to:
            self.sinks.append(_open_sink(name, output_dir, run_config))

    def log(self, record: dict, echo: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(record)
        if echo:
            tqdm.write(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            )

    def close(self) -> None:
        if self.file:
            self.file.close()


def _open_sink(name: str, output_dir: Path, run_config: dict):
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"))
            return lambda r: [
                writer.add_scalar(k, v, r["step"]) for k, v in r.items() if isinstance(v, float)
            ]
        import wandb

        wandb.init(project="difflm", config=run_config, dir=str(output_dir))
        return lambda r: wandb.log(r, step=r["step"])
    except ImportError:
        raise DifflmError(
            f"train.log_to includes '{name}' but it is not installed: pip install {name}"
        ) from None


# ----------------------------------------------------------------------------- the loop


@dataclass
class Loop:
    """What every step needs, built once by `train`: one object instead of a long argument list."""

    cfg: RunConfig
    run: Run
    model: nn.Module  # the bare model: evaluation and checkpoints
    wrapped: nn.Module  # what the step calls: the model, compiled and/or in its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world_size: int
    logger: Logger
    stop: int  # the last step of this invocation
    ema: EMA | None = None
    shape: tuple[int, int, int] | None = None  # (layers, heads, head width) for the FLOPs estimate
    n_params: int = 0
    peak_flops: float | None = None  # one device's FLOP/s, when known
    clock: float = field(default_factory=time.perf_counter)  # when the last step ended (or the loop began)


def train(cfg: RunConfig, run: Run) -> TrainState:
    """Train `run` as configured; returns the final state. Resumable and DDP-aware."""
    init_distributed()
    rank, world_size = world()
    tc = cfg.train
    _check_batch(tc, run, world_size)
    claim_output_dir(tc, is_writer=rank == 0)
    if world_size > 1:
        dist.barrier()  # the writer may have moved an old run aside
    loop, state = _setup(cfg, run, rank, world_size)
    bar = tqdm(
        total=loop.stop,
        initial=state.step,
        disable=rank != 0 or not tc.progress,
        desc="train",
        dynamic_ncols=True,
    )
    try:
        with StopSignals() as signals:
            while state.step < loop.stop:
                record = _train_step(loop, state)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_s']:.0f}")
                stopping = _any_rank(signals.requested is not None, loop.device)
                if _after_step(loop, state, record, stopping):
                    _log_early_stop(loop, state)
                    break
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped by {signals.requested or 'a signal'} after step {state.step} (checkpoint "
                        f"saved): continue with train.resume=latest train.output_dir={tc.output_dir}"
                    )
    finally:
        bar.close()
        loop.logger.close()
    return state


def _check_batch(tc: TrainConfig, run: Run, world_size: int) -> None:
    if tc.batch_size % (world_size * tc.grad_accum):
        raise DifflmError(
            f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
            f"({world_size} x {tc.grad_accum})"
        )
    if tc.length_grouping and not isinstance(getattr(run.train_data, "lengths", None), Tensor):
        raise DifflmError(
            f"train.length_grouping={tc.length_grouping} needs per-item lengths, which this task's "
            "training data does not have: set train.length_grouping=0"
        )
    if len(run.train_data) < tc.batch_size:
        raise DifflmError(
            f"the training split has {len(run.train_data)} sequences, fewer than train.batch_size={tc.batch_size}: "
            "lower train.batch_size or data.block_size, or use more data"
        )


def _setup(cfg: RunConfig, run: Run, rank: int, world_size: int) -> tuple[Loop, TrainState]:
    """Model on its device (adapters, shards), optimizer, loss scale, resumed state and logger."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cpu":
        allocator.keep_freed_memory()  # no page faults re-fetching freed activations every step
    torch.manual_seed(tc.seed)
    if tc.init_from and not tc.resume:  # the weights `load_pretrained` would give (EMA if kept)
        source = ckpt.resolve_checkpoint(tc.init_from)
        ckpt.load_weights(run.model, source, ckpt.inference_file(source))
    model = run.model.to(device)
    if tc.lora.r:  # freeze the model, train adapters only
        model = lora.add_adapters(model, tc.lora, model_family(cfg.model))
    sharded = tc.strategy == "fsdp" and world_size > 1
    if sharded:  # before the optimizer, which then holds sharded state
        model = fsdp.shard_model(model)
    optimizer = build_optimizer(model, tc)
    state, ema = TrainState(), None
    if tc.resume:
        state, ema = _resume(tc, model, optimizer)
        if rank == 0:
            trim_log(tc.output_dir, state.step)  # steps after the checkpoint are replayed
    if tc.ema and ema is None:
        ema = EMA(model, tc.ema)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    if state.grad_scaler and scaler.is_enabled():
        scaler.load_state_dict(state.grad_scaler)
    wrapped = torch.compile(model) if tc.compile else model  # shares the model's parameters
    if world_size > 1 and not sharded:
        wrapped = nn.parallel.DistributedDataParallel(wrapped)
    logger = Logger(Path(tc.output_dir), tc, to_dict(cfg), enabled=rank == 0)
    stop = min(tc.max_steps, tc.stop_at_step or tc.max_steps)
    loop = Loop(
        cfg,
        run,
        model,
        wrapped,
        optimizer,
        scaler,
        device,
        rank,
        world_size,
        logger,
        stop,
        ema=ema,
        shape=flops.attention_shape(getattr(model, "config", None)),
        n_params=sum(p.numel() for p in model.parameters()),
        peak_flops=flops.peak_flops(device, tc.peak_tflops),
    )
    return loop, state


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when any process got a stop signal, so all of them save and stop at the same step."""
    if world()[1] == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item())


def _train_step(loop: Loop, state: TrainState) -> dict:
    tc, run, model, device, scaler = loop.cfg.train, loop.run, loop.wrapped, loop.device, loop.scaler
    t0 = time.perf_counter()
    batch = collate([run.train_data[i] for i in _next_indices(run, tc, state)])
    torch.manual_seed(tc.seed + state.step)  # dropout: a function of the step, like the noise
    prepared = run.objective.prepare(batch, step_generator(tc.seed, state.step))
    local = split_batch(prepared, loop.world_size, loop.rank)
    model.train()
    total, metrics = 0.0, {}
    for i in range(tc.grad_accum):
        micro = to_device(split_batch(local, tc.grad_accum, i), device)
        sync = i == tc.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, tc.precision):
            loss, micro_metrics = run.objective.loss(model, micro)
        scaler.scale(loss / tc.grad_accum).backward()
        total += loss.item() / tc.grad_accum
        for k, v in micro_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v / tc.grad_accum
    if not math.isfinite(total):
        raise DifflmError(
            f"loss became {total} at step {state.step}: lower train.lr or use train.precision=fp32"
        )
    lr = get_lr(state.step, tc)
    set_lr(loop.optimizer, lr)
    scaler.unscale_(loop.optimizer)  # clip the true gradients (a no-op unless fp16)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
    scaler.step(loop.optimizer)  # fp16: skipped when a gradient overflowed, and the scale backs off
    scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ema:
        loop.ema.update()
    loss_value = _mean_across(total, device)
    tokens = prepared["input_ids"].numel()
    state.step += 1
    state.tokens_seen += tokens
    now = time.perf_counter()
    tok_s = tokens / (now - t0)
    state.wall_seconds += now - loop.clock  # this step and what ran since the last one (eval, save)
    loop.clock = now
    record = {"step": state.step, "loss": loss_value, "lr": lr, "tok_s": tok_s, "wall_s": state.wall_seconds, **metrics}
    record.update(_utilisation(loop, tok_s, prepared["input_ids"].shape[-1]))
    if grad_norm is not None:
        record["grad_norm"] = fsdp.full_value(grad_norm)
    if scaler.is_enabled():
        state.grad_scaler = scaler.state_dict()
        record["grad_scale"] = state.grad_scaler["scale"]
    return record


def _utilisation(loop: Loop, tok_s: float, seq_len: int) -> dict[str, float]:
    """Achieved TFLOP/s of all processes together and, when the device's peak is known, the MFU."""
    if loop.shape is None:
        return {}
    achieved = flops.flops_per_token(loop.shape, loop.n_params, seq_len) * tok_s
    out = {"tflops": achieved / 1e12}
    if loop.peak_flops:
        out["mfu"] = achieved / (loop.peak_flops * loop.world_size)
    return out


def _next_indices(run: Run, tc: TrainConfig, state: TrainState) -> list[int]:
    per_epoch = len(run.train_data) // tc.batch_size
    if state.batch_in_epoch >= per_epoch:
        state.epoch += 1
        state.batch_in_epoch = 0
    if tc.length_grouping:
        order = length_grouped_order(run.train_data.lengths, tc.batch_size, tc.length_grouping, state.epoch, tc.seed)
    else:
        order = batch_order(len(run.train_data), state.epoch, tc.seed)
    start = state.batch_in_epoch * tc.batch_size
    state.batch_in_epoch += 1
    return order[start : start + tc.batch_size].tolist()


def _mean_across(value: float, device: torch.device) -> float:
    _, world_size = world()
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size


def _from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's value on every process, so that decisions taken on it agree across processes."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return tensor.item()


def _after_step(loop: Loop, state: TrainState, record: dict, stopping: bool = False) -> bool:
    """Log, evaluate, save; True when train.patience ran out (the checkpoint is written then too)."""
    tc = loop.cfg.train
    last = state.step == loop.stop
    if state.step % tc.log_every == 0 or last or stopping:
        loop.logger.log(record, echo=not tc.progress)
    periodic = bool(tc.eval_every) and state.step % tc.eval_every == 0 or state.step == tc.max_steps
    out_of_patience = False
    if periodic or last:
        with loop.ema.applied() if loop.ema else contextlib.nullcontext():
            val_loss = evaluate_loss(loop.model, loop.run.objective, loop.run.val_data, tc)
        state.val_loss = _from_rank0(val_loss, loop.device)  # best and patience: one decision
        loop.logger.log({"step": state.step, "val_loss": state.val_loss})
        # an early stop_at_step's evaluation is no periodic one: a resumed run must count the same
        out_of_patience = periodic and _track_best(loop, state)
    if (tc.save_every and state.step % tc.save_every == 0) or last or stopping or out_of_patience:
        _save(loop, state)
    return out_of_patience and not last


def _track_best(loop: Loop, state: TrainState) -> bool:
    """Keep the best val loss (and checkpoints/best/); True when train.patience evaluations passed
    without a better one."""
    tc = loop.cfg.train
    if state.best_val_loss is not None and state.val_loss >= state.best_val_loss:
        state.evals_since_best += 1
        return bool(tc.patience) and state.evals_since_best >= tc.patience
    state.best_val_loss, state.evals_since_best = state.val_loss, 0
    if tc.keep_best and loop.rank == 0:
        ckpt.save_best(
            tc.output_dir,
            model=loop.model,
            run_config=to_dict(loop.cfg),
            trainer_state=asdict(state),
            tokenizer=loop.run.tokenizer,
            extra_files=_adapter_files(loop),
            ema=loop.ema,
        )
    if tc.keep_best and loop.world_size > 1:
        dist.barrier()
    return False


def _log_early_stop(loop: Loop, state: TrainState) -> None:
    reason = (
        f"no better val loss than {state.best_val_loss:.4g} in {state.evals_since_best} evaluations "
        f"(train.patience): stopped at step {state.step}, checkpoint saved"
    )
    loop.logger.log({"step": state.step, "early_stop": reason})


def _save(loop: Loop, state: TrainState) -> None:
    """The step folder: written by rank 0, or by every rank when FSDP shards the model."""
    cfg, model = loop.cfg, loop.model
    tc = cfg.train
    if fsdp.is_sharded(model):
        fsdp.save_sharded(
            tc.output_dir,
            state.step,
            model=model,
            optimizer=loop.optimizer,
            build=lambda: build_model(model_family(cfg.model), cfg.model),
            run_config=to_dict(cfg),
            trainer_state=asdict(state),
            tokenizer=loop.run.tokenizer,
            keep_last=tc.keep_last,
        )
    elif loop.rank == 0:
        ckpt.save_checkpoint(
            tc.output_dir,
            state.step,
            model=model,
            optimizer=loop.optimizer,
            run_config=to_dict(cfg),
            trainer_state=asdict(state),
            tokenizer=loop.run.tokenizer,
            keep_last=tc.keep_last,
            extra_files=_adapter_files(loop),
            ema=loop.ema,
        )
    if loop.world_size > 1:
        dist.barrier()


def _adapter_files(loop: Loop) -> list[Path]:
    """LoRA runs: the adapters alone (averaged when train.ema is on, like every inference weight),
    written beside the checkpoint for save_checkpoint to move in."""
    tc = loop.cfg.train
    if not tc.lora.r:
        return []
    staging = ckpt.checkpoints_dir(tc.output_dir) / ".adapters"
    with loop.ema.applied() if loop.ema else contextlib.nullcontext():
        return lora.write_adapters(loop.model, tc.lora, model_family(loop.cfg.model), staging)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, objective: Objective, data: Any, tc: TrainConfig, batches: int | None = None
) -> float:
    """Mean objective loss over the first `batches` val batches, with a fixed noise seed."""
    device = next(model.parameters()).device
    model.eval()
    n = min(batches or tc.eval_batches, max(1, len(data) // tc.batch_size))
    if len(data) == 0:
        raise DifflmError("the validation split is empty: raise data.val_fraction or use more data")
    losses = []
    for b in range(n):
        items = [data[i] for i in range(b * tc.batch_size, min(len(data), (b + 1) * tc.batch_size))]
        prepared = objective.prepare(collate(items), step_generator(tc.seed, b, salt=1))
        with autocast(device, tc.precision):
            loss, _ = objective.loss(model, to_device(prepared, device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def _resume(
    tc: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, EMA | None]:
    """The checkpoint's weights, optimizer and state; its EMA when it kept one and we keep one."""
    path = ckpt.resolve_checkpoint(tc.resume, tc.output_dir)
    ema = None
    if fsdp.is_sharded(model):
        fsdp.load_sharded(path, model, optimizer)
    else:
        if tc.ema and (path / ckpt.EMA_FILE).is_file():  # the average first: EMA copies the model
            ckpt.load_weights(model, path, ckpt.EMA_FILE)
            ema = EMA(model, tc.ema)
        ckpt.load_weights(model, path)
        ckpt.load_optimizer(optimizer, path)
    data = ckpt.read_json(path / ckpt.STATE_FILE)
    tqdm.write(f"resumed from {path} at step {data['step']}")
    return TrainState(**data), ema
