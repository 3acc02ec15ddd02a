"""Every system in one table: task name -> `System` (how to build, evaluate and sample it).

`difflm train`, `eval` and `sample` look a checkpoint's or recipe's `task` up here and nowhere else.
The functions are named as "module:function" strings, imported when used, so listing the systems
(`difflm systems`) or parsing flags imports no torch.

Adding a system: write a module in `systems/` with a builder `(RunConfig) -> Run`, an evaluator
`(Pretrained, EvalOptions) -> dict` and a sampler `(Pretrained, SampleOptions, ids, mask, generator)
-> SampleResult` (the options are `difflm eval` / `sample`'s flags, typed: evaluate/options.py,
sampling/settings.py), then add one `System` line to `SYSTEMS`.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difflm.errors import DifflmError

if TYPE_CHECKING:
    from difflm.config import RunConfig
    from difflm.train.trainer import Run

TEXT = "difflm.systems.text"
QWEN3 = "difflm.systems.qwen3_llada"
PREFIX = "difflm.systems.prefix_diffusion"
FORCING = "difflm.systems.forcing"


@dataclass(frozen=True)
class System:
    """One trainable system; functions as "module:function" (None: the system cannot do that)."""

    name: str
    description: str
    build: str  # (RunConfig) -> Run
    evaluate: str | None = None  # (Pretrained, EvalOptions) -> metrics dict
    sample: str | None = None  # (Pretrained, SampleOptions, ids, mask, generator) -> SampleResult: continue prompts
    sample_texts: str | None = None  # (Pretrained, SampleOptions) -> exit code: conditioned on whole texts

    def abilities(self) -> list[str]:
        """What `difflm` can do with this system: train, eval, sample."""
        can = {"train": True, "eval": self.evaluate, "sample": self.sample or self.sample_texts}
        return [name for name, able in can.items() if able]


def resolve(ref: str) -> Callable[..., Any]:
    """The function a "module:function" string names (imports its module)."""
    return pkgutil.resolve_name(ref)


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        System(
            "masked_diffusion",
            "LLaDA-style masked diffusion on packed text (difflm transformer)",
            f"{TEXT}:build_masked_diffusion",
            f"{TEXT}:eval_masked_diffusion",
            f"{TEXT}:sample_masked",
        ),
        System(
            "autoregressive",
            "next-token baseline on packed text (causal difflm transformer)",
            f"{TEXT}:build_autoregressive",
            f"{TEXT}:eval_autoregressive",
            f"{TEXT}:sample_autoregressive",
        ),
        System(
            "sgdd",
            "SGDD: a masked-diffusion decoder conditioned on a frozen sentence encoder",
            "difflm.systems.sgdd:build_sgdd",
            "difflm.evaluate.sgdd:eval_sgdd",
            sample_texts="difflm.evaluate.sgdd:sample_sgdd",
        ),
        System(
            "prefix_diffusion",
            "masked diffusion of documents after a clean prefix (HF masked LM or transformer)",
            f"{PREFIX}:build_prefix_diffusion",
            f"{PREFIX}:eval_prefix_system",
            f"{TEXT}:sample_masked",
        ),
        System(
            "poems_ar",
            "next-token baseline on the prefix-diffusion documents",
            f"{PREFIX}:build_poems_ar",
            f"{PREFIX}:eval_prefix_system",
            f"{TEXT}:sample_autoregressive",
        ),
        System(
            "teacher_forcing",
            "DFGPT trained by next-token prediction (the Diffusion Forcing baseline)",
            f"{FORCING}:build_forcing",
            "difflm.evaluate.forcing:eval_forcing",
            f"{TEXT}:sample_uncached",
        ),
        System(
            "diffusion_forcing",
            "DFGPT with per-token Gaussian noise levels in embedding space",
            f"{FORCING}:build_forcing",
            "difflm.evaluate.forcing:eval_forcing",
            f"{FORCING}:sample_diffusion_forcing",
        ),
        System(
            "qwen3_llada_pretrain",
            "bidirectional Qwen3 (LLaDA recipe) pretrained on packed text",
            f"{QWEN3}:build_pretrain",
            f"{TEXT}:eval_masked_diffusion",  # full attention (no block bias)
            f"{QWEN3}:sample",
        ),
        System(
            "qwen3_ar_pretrain",
            "causal Qwen3 (transformers' Qwen3ForCausalLM) pretrained on packed text: the AR model to convert",
            f"{QWEN3}:build_ar_pretrain",
            f"{TEXT}:eval_autoregressive",
            f"{TEXT}:sample_autoregressive",
        ),
        System(
            "qwen3_llada_sft",
            "bidirectional Qwen3 fine-tuned on conversations (answers masked, prompts kept)",
            f"{QWEN3}:build_sft",
            f"{QWEN3}:eval_sft",
            f"{QWEN3}:sample",
        ),
    )
}


def get_system(task: str) -> System:
    if task not in SYSTEMS:
        raise DifflmError(f"config key 'task' is {task!r}; valid choices: {', '.join(SYSTEMS)}")
    return SYSTEMS[task]


def build_run(cfg: RunConfig) -> Run:
    """Build the system named by `cfg.task`; model init is seeded by `train.seed`."""
    import torch

    builder = resolve(get_system(cfg.task).build)
    torch.manual_seed(cfg.train.seed)
    run = builder(cfg)
    return with_extra_train(run, cfg) if cfg.data.extra_train else run


def with_extra_train(run: Run, cfg: RunConfig) -> Run:
    """`run` with the blocks of `data.extra_train` after its packed-text training split."""
    import dataclasses

    from torch.utils.data import ConcatDataset

    from difflm.data.blocks import extra_train_blocks
    from difflm.data.packing import TokenBlocks

    if not isinstance(run.train_data, TokenBlocks):
        raise DifflmError(
            f"data.extra_train adds packed-text blocks, and task {cfg.task} does not train on packed "
            "text: drop data.extra_train"
        )
    extra = extra_train_blocks(cfg.data, run.tokenizer)
    return dataclasses.replace(run, train_data=ConcatDataset([run.train_data, *extra]))
