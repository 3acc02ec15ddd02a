"""Teacher Forcing vs Diffusion Forcing: one DFGPT, one flag (`model.use_diffusion_forcing`).

With the flag off the model is a plain nanoGPT trained by next-token loss (`AutoregressiveObjective`);
with it on, every token of a block gets its own Gaussian noise level and the model denoises the
whole block causally (`train/objectives.py:DiffusionForcingObjective`).  The flag is the one switch: the builder rewrites
`task` to match it (`teacher_forcing` / `diffusion_forcing`), so the checkpoint's `eval` and
`sample` dispatch follow the model that was actually trained.

The per-token levels and the noise are drawn in `DiffusionForcingObjective.prepare` on the whole global batch
with the step's generator, then split with the batch: resume and multi-process runs see the same
noise as an uninterrupted single-process run.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from difflm.config import RunConfig, model_family, opt, system_config
from difflm.data.blocks import text_blocks
from difflm.diffusion.gaussian import GaussianDiffusion
from difflm.errors import DifflmError
from difflm.models import build_model
from difflm.pretrained import Pretrained
from difflm.sampling.forcing import SCHEDULES, sample_forcing
from difflm.sampling.settings import SampleOptions
from difflm.sampling.unmask import SampleResult
from difflm.systems.text import init_tokenizer
from difflm.train.objectives import AutoregressiveObjective, DiffusionForcingObjective
from difflm.train.trainer import Run

TASK_OF_FLAG = {False: "teacher_forcing", True: "diffusion_forcing"}


@dataclasses.dataclass
class ForcingSystemConfig:
    """Sampling defaults of a Diffusion Forcing checkpoint (used by `difflm eval` and `difflm sample`)."""

    schedule: str = opt("pyramid", "Scheduling matrix of the sampler.", choices=tuple(SCHEDULES))
    horizon: int = opt(16, "Tokens generated per chunk (one scheduling matrix per chunk).")
    uncertainty_scale: float = opt(1.0, "Lag per token of the pyramid / trapezoid matrices.")
    sampling_timesteps: int | None = opt(
        None, "Denoising steps S of the sampler (null = model.gaussian.sampling_timesteps)."
    )

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise DifflmError(f"system.horizon must be >= 1, got {self.horizon}")
        if self.sampling_timesteps is not None and self.sampling_timesteps < 1:
            raise DifflmError(f"system.sampling_timesteps must be >= 1, got {self.sampling_timesteps}")
        if self.uncertainty_scale < 0:
            raise DifflmError(f"system.uncertainty_scale must be >= 0, got {self.uncertainty_scale}")


def sampling_diffusion(model: nn.Module, sampling_timesteps: int | None) -> GaussianDiffusion:
    """The model's Gaussian diffusion, or a copy with S sampling steps (validated: S <= timesteps)."""
    if sampling_timesteps is None or sampling_timesteps == model.config.gaussian.sampling_timesteps:
        return model.diffusion
    gaussian = dataclasses.replace(model.config.gaussian, sampling_timesteps=sampling_timesteps)
    return GaussianDiffusion(gaussian).to(model.diffusion.alpha_bar_ext.device)


def build_forcing(cfg: RunConfig) -> Run:
    """The `teacher_forcing` / `diffusion_forcing` system: DFGPT on packed text blocks."""
    if model_family(cfg.model) != "dfgpt":
        raise DifflmError(f"task '{cfg.task}' trains model.family=dfgpt, got {model_family(cfg.model)}")
    system_config(cfg, ForcingSystemConfig)  # validate the sampling defaults now, not at eval time
    tokenizer, train, val = text_blocks(cfg.data, init_tokenizer(cfg))
    flag = cfg.model.use_diffusion_forcing
    # next-token loss feeds block - 1 inputs; sized to that, no position embedding goes untrained
    length = cfg.data.block_size if flag else cfg.data.block_size - 1
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, block_size=length)
    cfg.task = TASK_OF_FLAG[flag]
    model = build_model("dfgpt", cfg.model)
    if flag:
        objective = DiffusionForcingObjective(cfg.model.gaussian, cfg.model.n_embd)
    else:
        objective = AutoregressiveObjective()
    return Run(model, objective, train, val, tokenizer)


# ----------------------------------------------------------------------------- `difflm sample` entries


def sample_diffusion_forcing(
    pre: Pretrained, opts: SampleOptions, ids: Tensor, mask: Tensor, generator: torch.Generator
) -> SampleResult:
    """DFGPT with the flag on: `sample_forcing`; --schedule / --horizon / --steps override `system`."""
    if not bool(mask.all()):
        raise DifflmError("Diffusion Forcing sampling needs prompts of equal length (no padding)")
    system = system_config(pre.config, ForcingSystemConfig)
    steps = opts.steps if opts.steps is not None else system.sampling_timesteps
    passes: list[int] = []
    hook = pre.model.register_forward_hook(lambda *_: passes.append(1))
    try:
        tokens, trace = sample_forcing(
            pre.model,
            sampling_diffusion(pre.model, steps),
            ids,
            max_new_tokens=opts.gen_length,
            horizon=opts.horizon if opts.horizon is not None else system.horizon,
            schedule=opts.schedule or system.schedule,
            uncertainty_scale=system.uncertainty_scale,
            generator=generator,
            trace=opts.trace,
        )
    finally:
        hook.remove()
    full_mask = torch.ones_like(tokens)
    return SampleResult(tokens, trace, len(passes), full_mask)
