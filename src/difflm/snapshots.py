"""Load a downloaded Hugging Face snapshot of a published diffusion LM natively (no trust_remote_code).

A snapshot folder is what `huggingface-cli download GSAI-ML/LLaDA-8B-Instruct` (or
Dream-org/Dream-v0-Instruct-7B) leaves: config.json, safetensors shards (+ their index), the tokenizer
and its chat template. Its `model_type` picks difflm's own class (`llada`, `Dream`, or a converted
`qwen3_llada` folder) through the Auto classes that `import difflm` registered; the published
modeling code in the folder is never run. Weights stream shard by shard into a model built on the
meta device (transformers' `from_pretrained`), in bfloat16 by default on a GPU, so an 8B model needs
about its own size in RAM, not twice it; the model then moves whole to one device (no device_map).
The tokenizer's mask token is pinned to the config's `mask_token_id` (LLaDA 126336, Dream 151666).

`map_keys` (`difflm inspect DIR`) lines up a folder's stored keys with the parameters of difflm's
model, built on the meta device from the config alone: nothing is loaded, headers are read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from difflm.config import RunConfig
from difflm.data.tokenizers import HFTokenizer
from difflm.errors import DifflmError

SNAPSHOT_TYPES = ("llada", "Dream", "qwen3_llada")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_snapshot(path: Path) -> bool:
    """A folder with an HF config.json and no difflm run config (difflm.json)."""
    return (path / "config.json").is_file() and not (path / "difflm.json").is_file()


def snapshot_type(path: Path) -> str:
    """The model_type of the folder's config.json, one difflm runs natively (else one line)."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SNAPSHOT_TYPES:
        raise DifflmError(
            f"{path} holds a {model_type!r} model; difflm runs {', '.join(SNAPSHOT_TYPES)} snapshots natively"
        )
    return model_type


def check_snapshot(path: Path) -> str:
    """The folder's model_type, after checking that config, every weight shard and the tokenizer
    are there; a missing piece raises one line naming it."""
    model_type = snapshot_type(path)
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


def load_snapshot(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, HFTokenizer, RunConfig]:
    """The parts of a `difflm.pretrained.Pretrained` for a snapshot folder: the model in the denoiser
    protocol, its tokenizer and a masked-diffusion run config."""
    from difflm.models.decoder import as_denoiser

    check_snapshot(path)
    model = as_denoiser(load_model(path, device, dtype))
    return model, load_tokenizer(path, model.mask_token_id), RunConfig(task="masked_diffusion")


# ----------------------------------------------------------------------------- key mapping

LAYER_INDEX = re.compile(r"\.(\d+)\.")  # the first ".N." of a key: its layer
KEY_STATUSES = ("ok", "shape differs", "missing", "shard missing", "unexpected")


@dataclass(frozen=True)
class KeyRow:
    """One line of `map_keys`: a key as stored (the first layer's key of `layers` alike ones), the
    parameter of difflm's model it loads into, shape and dtype as stored, and a status: ok,
    shape differs, missing (the model needs it, the folder lacks it), shard missing (the index
    names it in a shard the folder lacks) or unexpected (stored, loaded into nothing)."""

    key: str
    target: str  # "<owning class>.<attribute>.<param> (<module class>)", "-" for an unexpected key
    shape: tuple[int, ...] | None
    dtype: str | None  # as stored (F32, BF16, ...); None when not stored
    status: str
    note: str = ""
    layers: int = 1


def map_keys(path: Path) -> tuple[str, list[KeyRow]]:
    """difflm's class for the folder and a row per stored or expected key (natural order, the
    per-layer keys that load alike grouped into their first layer's row). Keys load by name: difflm's
    classes use the published names."""
    snapshot_type(path)
    class_name, params = _model_params(path)
    stored = _stored_keys(path)
    keys = sorted(stored.keys() | params.keys(), key=_natural)
    return class_name, _group_layers([_key_row(key, stored.get(key), params.get(key)) for key in keys])


def _model_params(path: Path) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
    """difflm's model class name and key -> (shape, owner) of its state dict, built on meta."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(path))
    params = {}
    for key, tensor in model.state_dict().items():
        module = key.rpartition(".")[0]
        params[key] = (
            tuple(tensor.shape),
            f"{_owner(model, key)} ({type(model.get_submodule(module)).__name__})",
        )
    return type(model).__name__, params


def _owner(model: torch.nn.Module, key: str) -> str:
    """`key` as "<class>.<path>": from its nearest enclosing module that is not a plain container
    (ModuleList / ModuleDict), e.g. LLaDABlock.q_proj.weight, LLaDAStack.transformer.wte.weight."""
    parts = key.split(".")
    for cut in range(len(parts) - 2, 0, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        if not isinstance(owner, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            return ".".join([type(owner).__name__, *parts[cut:]])
    return ".".join([type(model).__name__, *parts])


def _stored_keys(path: Path) -> dict[str, tuple[str, tuple[int, ...] | None, str | None]]:
    """key -> (file, shape, dtype) from the safetensors headers; the keys the index puts in a
    file the folder lacks have shape and dtype None."""
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    files = sorted(set(weight_map.values())) or ["model.safetensors"]
    stored = {key: (file, None, None) for key, file in weight_map.items()}
    for file in files:
        if not (path / file).is_file():
            if not weight_map:
                raise DifflmError(f"{path} has no safetensors weights (model.safetensors or an index)")
            continue
        try:
            with safe_open(str(path / file), framework="pt") as handle:
                for key in handle.keys():
                    header = handle.get_slice(key)
                    stored[key] = (file, tuple(header.get_shape()), header.get_dtype())
        except (SafetensorError, OSError) as err:
            raise DifflmError(f"{path / file} is not a readable safetensors file ({err})") from None
    return stored


def _key_row(key: str, stored: tuple | None, param: tuple | None) -> KeyRow:
    if param is None:
        return KeyRow(key, "-", stored[1], stored[2], "unexpected")
    shape, target = param
    if stored is None:
        return KeyRow(key, target, shape, None, "missing")
    file, stored_shape, dtype = stored
    if stored_shape is None:
        return KeyRow(key, target, shape, None, "shard missing", note=file)
    if stored_shape != shape:
        return KeyRow(key, target, stored_shape, dtype, "shape differs", note=f"model {list(shape)}")
    return KeyRow(key, target, shape, dtype, "ok")


def _natural(key: str) -> list:
    """Sort key reading digit runs as numbers (layer 2 before layer 10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _group_layers(rows: list[KeyRow]) -> list[KeyRow]:
    """Loaded per-layer rows that differ only in their layer index become one row (the first
    layer's key, `layers` = how many); every other row stays alone."""
    first: dict[tuple, KeyRow] = {}
    count: dict[tuple, int] = {}
    for row in rows:
        alike = row.status == "ok" and LAYER_INDEX.search(row.key)
        group = (
            (LAYER_INDEX.sub(".N.", row.key, count=1), row.target, row.shape, row.dtype)
            if alike
            else (row.key,)
        )
        first.setdefault(group, row)
        count[group] = count.get(group, 0) + 1
    return [dataclasses.replace(row, layers=count[group]) for group, row in first.items()]


def render_key_map(path: Path, class_name: str, rows: list[KeyRow]) -> str:
    """The rows as aligned text lines: key [xN layers] -> target, shape, dtype, status."""
    lines = [f"{path} -> difflm {class_name} (keys load by name; keys alike in N layers shown once)"]
    left = [row.key + (f"  x{row.layers} layers" if row.layers > 1 else "") for row in rows]
    width, target_width = max(map(len, left)), max(len(row.target) for row in rows)
    for text, row in zip(left, rows, strict=True):
        shape = "-" if row.shape is None else str(list(row.shape))
        status = f"{row.status} ({row.note})" if row.note else row.status
        lines.append(
            f"{text:<{width}}  ->  {row.target:<{target_width}}  {shape:<14} {row.dtype or '-':<5} {status}"
        )
    totals = {status: sum(r.layers for r in rows if r.status == status) for status in KEY_STATUSES}
    lines.append(", ".join(f"{n} {status}" for status, n in totals.items() if n))
    return "\n".join(lines)
