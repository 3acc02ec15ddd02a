"""The checkpoints a server holds: each loaded once, named, and tagged diffusion or autoregressive.

A served model is a `Pretrained` plus what the server needs to check a request before it reaches
the batcher: its name in `/v1/models`, its context length and how it is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflm.errors import DifflmError
from difflm.models.protocol import max_length_of
from difflm.pretrained import Pretrained, load_pretrained

DIFFUSION_TASKS = ("masked_diffusion", "prefix_diffusion", "qwen3_llada_pretrain", "qwen3_llada_sft")
AUTOREGRESSIVE_TASKS = ("autoregressive", "poems_ar")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class ServedModel:
    name: str
    pre: Pretrained
    autoregressive: bool
    max_length: int  # prompt + generated tokens
    device: str

    @property
    def tokenizer(self):
        return self.pre.tokenizer

    def suppressed(self) -> list[int]:
        """Special ids never generated (mask included, for AR models); an SFT model may end its
        answer with EOS."""
        tok = self.tokenizer
        allowed = {tok.eos_token_id} if self.ends_with_eos else set()
        return sorted(i for i in tok.special_ids if i not in allowed)

    @property
    def ends_with_eos(self) -> bool:
        return self.pre.config.task.endswith("_sft") and self.tokenizer.eos_token_id is not None


def load_served(
    path: str | Path, device: str = "cpu", dtype: str = "float32", name: str | None = None
) -> ServedModel:
    """Load a step or run folder for serving; `name` defaults to the run folder's name."""
    if dtype not in DTYPES:
        raise DifflmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pre = load_pretrained(path, device)
    task = pre.config.task
    if task not in DIFFUSION_TASKS + AUTOREGRESSIVE_TASKS:
        raise DifflmError(
            f"checkpoint '{pre.path}' is a {task} model; the server samples {', '.join(DIFFUSION_TASKS + AUTOREGRESSIVE_TASKS)}"
        )
    pre.model.to(DTYPES[dtype])
    return ServedModel(
        name=name or _default_name(pre.path),
        pre=pre,
        autoregressive=task in AUTOREGRESSIVE_TASKS,
        max_length=max_length_of(pre.model),
        device=device,
    )


def _default_name(step_folder: Path) -> str:
    """`runs/NAME/checkpoints/step-N` -> NAME; any other folder -> its own name."""
    if step_folder.parent.name == "checkpoints":
        return step_folder.parent.parent.name
    return step_folder.name
