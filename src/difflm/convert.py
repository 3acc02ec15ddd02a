"""Turn a Hugging Face Qwen3 checkpoint into Qwen3-LLaDA, and compare two checkpoints' tensors.

`convert_qwen3` copies every weight unchanged (the key names are the same, see
`difflm.models.qwen3_llada`), then makes sure a mask token exists: in the tokenizer when the folder
has one, and in the embedding. If the token's id falls past the last embedding row, the embedding
(and an untied LM head) grows to hold it and each new row is the mean of the original rows, which
keeps the new input near the distribution the layers were trained on. Real Qwen3 checkpoints carry
spare, never-used rows past the tokenizer's vocabulary; the mask token then takes the first spare row
and no weight changes at all.

`inspect_checkpoints` reads only the safetensors headers, so it is instant even for 8B checkpoints.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from rich.table import Table
from safetensors import SafetensorError, safe_open

from difflm.errors import DifflmError
from difflm.models.qwen3_llada import Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ConvertReport:
    """What `convert_qwen3` did."""

    dst: str
    mask_token: str
    mask_token_id: int
    vocab_before: int  # embedding rows in the source
    vocab_after: int  # embedding rows in the converted model
    token_added: bool  # the mask token was new to the tokenizer
    has_tokenizer: bool


def _read_config(src: Path) -> dict:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise DifflmError(f"{src} has no config.json; point convert at a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DifflmError(
            f"{config_path} is not valid JSON ({err}); restore the checkpoint's config"
        ) from None
    if not isinstance(config, dict):
        raise DifflmError(f"{config_path} must hold a JSON object; restore the checkpoint's config")
    model_type = config.get("model_type", "unknown")
    if model_type != "qwen3":
        raise DifflmError(
            f"{src} is a {model_type} checkpoint, not Qwen3; convert expects a folder whose "
            "config.json has model_type 'qwen3'"
        )
    return config


def _load_tokenizer(src: Path):
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def _load_model(src: Path, config_dict: dict) -> Qwen3LLaDAForMaskedLM:
    if not any(src.glob("*.safetensors")):
        raise DifflmError(
            f"{src} has no .safetensors weights; convert reads safetensors only (re-save a .bin "
            "checkpoint with save_pretrained(safe_serialization=True) in a trusted environment)"
        )
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    try:
        config = Qwen3LLaDAConfig.from_dict({**fields, "use_cache": False})
        model, info = Qwen3LLaDAForMaskedLM.from_pretrained(
            src, config=config, dtype="auto", output_loading_info=True, use_safetensors=True
        )
    except (OSError, ValueError, TypeError, SafetensorError) as err:
        raise DifflmError(
            f"cannot load {src} as a Qwen3 checkpoint: {str(err).strip().splitlines()[0]}"
        ) from None
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        raise DifflmError(f"{src} does not match the Qwen3 layout ({problems}); is it a complete checkpoint?")
    return model


def _grow_embeddings(model: Qwen3LLaDAForMaskedLM, rows: int) -> None:
    """Resize the embedding (and an untied head) to `rows`; new rows = mean of the old rows."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        matrices.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:old_rows].float().mean(dim=0)  # [D]
            weight[old_rows:] = mean.to(weight.dtype)


def _ensure_mask_token(tokenizer, mask_token: str, rows: int) -> tuple[int, bool]:
    """The mask token's id and whether it was added; without a tokenizer it takes id `rows`."""
    if tokenizer is None:
        return rows, False
    added = tokenizer.add_special_tokens({"mask_token": mask_token}) > 0
    return tokenizer.convert_tokens_to_ids(mask_token), added


def _check_destination(dst: Path) -> None:
    """A new or empty folder whose parent can be written: checked before any weight is read."""
    if dst.exists() and not dst.is_dir():
        raise DifflmError(f"{dst} is a file; give a new output folder")
    if dst.exists() and any(dst.iterdir()):
        raise DifflmError(f"{dst} already exists and is not empty; choose a new output folder")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent)).rmdir()
    except OSError as err:
        raise DifflmError(
            f"cannot write into {dst.parent} ({err.strerror}); choose a writable folder"
        ) from None


def _save(model: Qwen3LLaDAForMaskedLM, tokenizer, dst: Path) -> None:
    """Write into a temporary sibling folder, then rename, so a failed save leaves no half folder."""
    if dst.exists() and not dst.is_dir():
        raise DifflmError(f"{dst} is a file; give a new output folder")
    if dst.exists() and any(dst.iterdir()):
        raise DifflmError(f"{dst} already exists and is not empty; choose a new output folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any folder
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_qwen3(src: str, dst: str, *, mask_token: str = "<|mask|>") -> ConvertReport:
    """Convert the Qwen3 checkpoint folder `src` into a Qwen3-LLaDA checkpoint folder `dst`."""
    src_path, dst_path = Path(src), Path(dst)
    if not mask_token.strip():
        raise DifflmError("the mask token is empty; give its text, e.g. <|mask|>")
    _check_destination(dst_path)
    config_dict = _read_config(src_path)
    tokenizer = _load_tokenizer(src_path)
    model = _load_model(src_path, config_dict)
    rows = model.get_input_embeddings().weight.shape[0]
    mask_id, added = _ensure_mask_token(tokenizer, mask_token, rows)
    if mask_id >= rows:
        _grow_embeddings(model, mask_id + 1)
    model.config.mask_token_id = mask_id
    _save(model, tokenizer, dst_path)
    return ConvertReport(
        dst=str(dst_path),
        mask_token=mask_token,
        mask_token_id=mask_id,
        vocab_before=rows,
        vocab_after=model.get_input_embeddings().weight.shape[0],
        token_added=added,
        has_tokenizer=tokenizer is not None,
    )


# ---------------------------------------------------------------- inspect

EQUAL, SHAPE_DIFFERS, ONLY_A, ONLY_B = "equal", "shape differs", "only in A", "only in B"


class InspectRow(NamedTuple):
    key: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    status: str


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: a file itself, a sharded index, model.safetensors, or all."""
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DifflmError(f"{path} holds no .safetensors file; point inspect at a checkpoint folder")
    return files


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no tensor is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _safetensors_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise DifflmError(f"{file} is not a readable safetensors file ({err})") from None
    return shapes


def inspect_checkpoints(a: str, b: str) -> list[InspectRow]:
    """Compare the tensor names and shapes of two checkpoints, one row per key (sorted)."""
    shapes_a, shapes_b = read_shapes(a), read_shapes(b)
    rows = []
    for key in sorted(shapes_a.keys() | shapes_b.keys()):
        shape_a, shape_b = shapes_a.get(key), shapes_b.get(key)
        if shape_b is None:
            status = ONLY_A
        elif shape_a is None:
            status = ONLY_B
        else:
            status = EQUAL if shape_a == shape_b else SHAPE_DIFFERS
        rows.append(InspectRow(key, shape_a, shape_b, status))
    return rows


def render_inspect_table(rows: list[InspectRow], *, only_differences: bool = False) -> Table:
    """A rich table of `inspect_checkpoints` rows, with a count of each status as caption."""
    styles = {EQUAL: "green", SHAPE_DIFFERS: "yellow", ONLY_A: "red", ONLY_B: "red"}
    table = Table()
    table.add_column("key", overflow="fold")
    for column in ("shape A", "shape B", "status"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        if only_differences and row.status == EQUAL:
            continue
        shape_a = "-" if row.shape_a is None else str(list(row.shape_a))
        shape_b = "-" if row.shape_b is None else str(list(row.shape_b))
        table.add_row(row.key, shape_a, shape_b, f"[{styles[row.status]}]{row.status}[/]")
    counts = {status: sum(row.status == status for row in rows) for status in styles}
    table.caption = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    return table
