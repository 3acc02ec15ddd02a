"""Checkpoints: one folder per step, written atomically, verified on load.

Layout of `{output_dir}/checkpoints/step-{N}/`:
  model.safetensors      weights (shared/tied tensors stored once)
  optimizer.safetensors  optimizer tensors; param groups and scalars in the metadata
  difflm.json            the whole run config, so `sample`/`eval` need only this path
  trainer_state.json     step, epoch, batch in epoch, tokens seen, last val loss
  config.json            (HF families only) the HF config, so `from_pretrained(path)` works
  tokenizer files
  manifest.json          file sizes, written last: a folder without it, or whose files differ
                         from it, is an interrupted or truncated write and is refused.
The folder is written under a temporary name and renamed into place; `checkpoints/latest`
(a one-line text file naming the step folder) is replaced after the rename. A crash at any moment
leaves the last good checkpoint, and `latest`, untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from difflm.errors import DifflmError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RUN_CONFIG_FILE = "difflm.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    run_config: dict,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer: Any = None,
    keep_last: int = 0,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Write step folder `step-N` atomically; `extra_files` (written elsewhere, e.g. the FSDP
    shards of every rank) are moved in before the manifest."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    if hasattr(getattr(model, "config", None), "save_pretrained"):
        model.config.save_pretrained(tmp)  # HF families: config.json for from_pretrained
    if optimizer is not None:
        _save_optimizer(optimizer, tmp / OPTIMIZER_FILE)
    if tokenizer is not None:
        tokenizer.save(tmp)
    _write_json(tmp / RUN_CONFIG_FILE, run_config)
    _write_json(tmp / STATE_FILE, trainer_state)
    for path in extra_files:
        shutil.move(str(path), tmp / Path(path).name)
    _write_manifest(tmp)
    _swap_into_place(tmp, final)
    _write_latest(root, final.name)
    if keep_last > 0:
        _prune(root, keep_last)
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(_step_folders(root), key=lambda p: int(p.name.split("-")[1]))
    for path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _step_folders(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False))


def _write_manifest(folder: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _write_json(folder / MANIFEST_FILE, {"files": sizes})


# ----------------------------------------------------------------------------- reading


def resolve_checkpoint(where: str | Path, output_dir: str | Path | None = None) -> Path:
    """'latest' or 'step-N' (inside `output_dir`), a run folder, or a checkpoint folder -> verified path."""
    where = str(where)
    if where in ("latest",) or (where.startswith("step-") and not Path(where).exists()):
        if output_dir is None:
            raise DifflmError(f"cannot resolve checkpoint '{where}' without an output_dir")
        root = checkpoints_dir(output_dir)
        name = where
        if where == "latest":
            latest = root / "latest"
            if not latest.is_file():
                raise DifflmError(f"no checkpoint to resume in {root}: train first, or set train.resume=null")
            name = latest.read_text().strip()
        path = root / name
    else:
        path = Path(where)
        if (path / "checkpoints" / "latest").is_file():  # a run folder: take its latest
            return resolve_checkpoint("latest", path)
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise DifflmError(f"checkpoint '{path}' not found: pass a step folder, a run folder, or 'latest'")
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        raise DifflmError(
            f"checkpoint '{path}' is incomplete (no {MANIFEST_FILE}): resume from an earlier step"
        )
    expected = json.loads(manifest.read_text())["files"]
    for name, size in expected.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise DifflmError(
                f"checkpoint '{path}' is truncated or corrupt ({name} differs from its manifest): "
                "resume from an earlier step"
            )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    except (SafetensorError, OSError) as err:
        raise DifflmError(f"cannot read weights in '{path}': {err}") from None
    if unexpected or [k for k in missing if not _is_tied_alias(model, k)]:
        raise DifflmError(
            f"weights in '{path}' do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    """save_model stores a tied tensor once; its other name shows up as 'missing' but is loaded."""
    tensor = model.state_dict().get(key)
    if tensor is None:
        return False
    return any(
        other is not tensor and other.data_ptr() == tensor.data_ptr() for other in model.state_dict().values()
    )


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    file = path / OPTIMIZER_FILE
    try:
        tensors = load_file(str(file))
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError) as err:
        raise DifflmError(f"cannot read optimizer state in '{path}': {err}") from None
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
