"""Load a downloaded Hugging Face snapshot of a published diffusion LM natively (no trust_remote_code).

A snapshot folder is what `huggingface-cli download GSAI-ML/LLaDA-8B-Instruct` (or
Dream-org/Dream-v0-Instruct-7B) leaves: config.json, safetensors shards (+ their index), the tokenizer
and its chat template. Its `model_type` picks difflm's own class (`llada`, `Dream`, or a converted
`qwen3_llada` folder) through the Auto classes that `import difflm` registered; the published
modeling code in the folder is never run. Weights stream shard by shard into a model built on the
meta device (transformers' `from_pretrained`), in bfloat16 by default on a GPU, so an 8B model needs
about its own size in RAM, not twice it; the model then moves whole to one device (no device_map).
The tokenizer's mask token is pinned to the config's `mask_token_id` (LLaDA 126336, Dream 151666).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflm.config import RunConfig
from difflm.data.tokenizers import HFTokenizer
from difflm.errors import DifflmError

SNAPSHOT_TYPES = ("llada", "Dream", "qwen3_llada")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_snapshot(path: Path) -> bool:
    """A folder with an HF config.json and no difflm run config (difflm.json)."""
    return (path / "config.json").is_file() and not (path / "difflm.json").is_file()


def check_snapshot(path: Path) -> str:
    """The folder's model_type, after checking that config, every weight shard and the tokenizer
    are there; a missing piece raises one line naming it."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SNAPSHOT_TYPES:
        raise DifflmError(
            f"{path} holds a {model_type!r} model; difflm runs {', '.join(SNAPSHOT_TYPES)} snapshots natively"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise DifflmError(
                f"{path} is incomplete: {len(missing)} of {len(shards)} weight shards missing "
                f"(first: {missing[0]}); finish the download"
            )
    elif not (path / "model.safetensors").is_file():
        raise DifflmError(
            f"{path} has no safetensors weights (model.safetensors or an index); finish the download"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DifflmError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); finish the download")
    return model_type


def load_model(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The HF model of a checked snapshot on `device`: bfloat16 on CUDA, float32 elsewhere by default."""
    import transformers
    from transformers import AutoModelForMaskedLM

    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    legacy = {"low_cpu_mem_usage": True} if int(transformers.__version__.split(".")[0]) < 5 else {}
    model = AutoModelForMaskedLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, **legacy
    )  # streams shards
    return model.to(device).eval()


def load_tokenizer(path: Path, mask_token_id: int) -> HFTokenizer:
    """The snapshot's tokenizer with its mask token set to the model's (by id, never added)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.mask_token_id != mask_token_id:
        if mask_token_id >= len(tok):
            raise DifflmError(
                f"mask_token_id {mask_token_id} is outside the tokenizer of {path} ({len(tok)} tokens)"
            )
        tok.mask_token = tok.convert_ids_to_tokens(mask_token_id)
    return HFTokenizer(tok)


def load_snapshot(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A `difflm.pretrained.Pretrained` (model in the denoiser protocol, tokenizer, a masked-diffusion
    run config) for a snapshot folder."""
    from difflm.models.decoder import as_denoiser
    from difflm.pretrained import Pretrained

    check_snapshot(path)
    model = as_denoiser(load_model(path, device, dtype))
    return Pretrained(
        model, load_tokenizer(path, model.mask_token_id), RunConfig(task="masked_diffusion"), path
    )
