"""Checkpoints: one folder per step, written atomically, verified on load.

Layout of `{output_dir}/checkpoints/step-{N}/`:
  model.safetensors      weights (a tied tensor stored once; its other names listed in the manifest)
  ema.safetensors        (train.ema only) the averaged weights, same names: what `load_pretrained`
                         loads for eval and sample; model.safetensors keeps the raw ones for resume
  optimizer.safetensors  optimizer tensors; param groups and scalars in the metadata
  difflm.json            the whole run config, so `sample`/`eval` need only this path
  trainer_state.json     step, epoch, batch in epoch, tokens seen, last val loss
  config.json            (HF families only) the HF config, so `from_pretrained(path)` works
  tokenizer files
  manifest.json          written last: each file's size and sha256 (hashed as the folder is
                         written), and the tied weight names. A folder without it, or whose files
                         differ from it, is an interrupted, truncated or corrupted write: refused.
The folder is written under a temporary name and renamed into place; `checkpoints/latest`
(a one-line text file naming the step folder) is replaced after the rename. A crash at any moment
leaves the last good checkpoint, and `latest`, untouched. Old checkpoints are pruned by renaming
them to `.trash-step-N` first, so a kill while pruning never leaves a half-deleted step folder;
leftover `.trash-*` / `.old-*` folders are removed by the next save (an `.old-NAME` whose NAME
is missing, a swap killed between its two renames, is renamed back instead).

`checkpoints/best/` (train.keep_best) is the same layout without the optimizer, replaced by the
same swap whenever the val loss improves; its trainer_state holds that step and val loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file

from difflm.errors import DifflmError

if TYPE_CHECKING:
    from difflm.train.ema import EMA

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
BEST_NAME = "best"
OPTIMIZER_FILE = "optimizer.safetensors"
RUN_CONFIG_FILE = "difflm.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # 1: sizes only (still read); 2: sizes, sha256 and tied names
STEP_NAME = re.compile(r"step-(\d+)")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_number(path: Path) -> int | None:
    match = STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


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
    ema: EMA | None = None,
) -> Path:
    """Write step folder `step-N` atomically; `extra_files` (written elsewhere, e.g. the FSDP
    shards of every rank) are moved in before the manifest."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, (".trash-", ".old-"))  # finish a prune or swap a kill interrupted
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    write_folder(
        tmp,
        model=model,
        run_config=run_config,
        trainer_state=trainer_state,
        optimizer=optimizer,
        tokenizer=tokenizer,
        extra_files=extra_files,
        ema=ema,
    )
    _swap_into_place(tmp, final)
    _write_latest(root, final.name)
    if keep_last > 0:
        _prune(root, keep_last, step)
    return final


def save_best(output_dir: str | Path, **folder: Any) -> Path:
    """Replace `checkpoints/best/` with a new folder (`write_folder`'s keywords): written aside, then
    swapped in, so a crash at any moment leaves the previous best whole."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, (".old-",))
    tmp = root / f".tmp-{BEST_NAME}-{os.getpid()}"
    write_folder(tmp, **folder)
    _swap_into_place(tmp, root / BEST_NAME)
    return root / BEST_NAME


def write_folder(
    folder: Path,
    *,
    model: torch.nn.Module,
    run_config: dict,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer: Any = None,
    extra_files: Sequence[Path] = (),
    ema: EMA | None = None,
) -> None:
    """Write one checkpoint into a fresh `folder` (replaced if it exists); `extra_files` are moved
    in; the manifest is written last."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _save_model_file(model, folder / MODEL_FILE)
    if ema is not None:
        with ema.applied():
            _save_model_file(model, folder / EMA_FILE)
    tied = _tied_names(model, folder / MODEL_FILE)
    if hasattr(getattr(model, "config", None), "save_pretrained"):
        model.config.save_pretrained(folder)  # HF families: config.json for from_pretrained
    if optimizer is not None:
        _save_optimizer(optimizer, folder / OPTIMIZER_FILE)
    if tokenizer is not None:
        tokenizer.save(folder)
    _write_json(folder / RUN_CONFIG_FILE, run_config)
    _write_json(folder / STATE_FILE, trainer_state)
    for path in extra_files:
        shutil.move(str(path), folder / Path(path).name)
    _write_manifest(folder, tied)


def export_checkpoint(
    source: Path,
    dst: Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    dtype: torch.dtype,
    data_path: str | None = None,
) -> Path:
    """A standalone copy of the checkpoint `source` at `dst` for sharing: weights cast to `dtype`,
    no optimizer state; run config and trainer state kept (`sample` / `eval` need only the path).
    `data_path` replaces the config's data source (what `eval` of the copy reads: e.g. a corpus
    name when the run trained on a file that is not shared). `dst` must not exist; it appears
    whole or not at all."""
    if dst.exists():
        raise DifflmError(f"{dst} already exists; remove it or choose another folder")
    run_config = read_json(source / RUN_CONFIG_FILE)
    if data_path is not None:
        run_config["data"] = {**run_config.get("data", {}), "path": data_path}
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    write_folder(
        tmp,
        model=model.to(dtype),
        run_config=run_config,
        trainer_state=read_json(source / STATE_FILE),
        tokenizer=tokenizer,
    )
    tmp.rename(dst)
    return dst


def remove_leftovers(root: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """Delete the hidden folders a killed save or prune left behind (`.tmp-*`, `.trash-*`, `.old-*`)."""
    _undo_swaps(root)
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefixes)] if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _undo_swaps(root: Path) -> None:
    """A kill between `_swap_into_place`'s two renames leaves `.old-NAME` and no NAME: put it back."""
    for old in root.glob(".old-*"):
        final = root / old.name.removeprefix(".old-")
        if old.is_dir() and not final.exists():
            old.rename(final)


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


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `step`; never touch a later step's folder."""
    ours = sorted(
        (n, p) for p in root.iterdir() if p.is_dir() and (n := step_number(p)) is not None and n <= step
    )
    for _, path in ours[:-keep_last]:
        trash = path.with_name(f".trash-{path.name}")
        path.rename(trash)  # atomic: the step folder is either whole or gone
        shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False))


def _tied_names(model: torch.nn.Module, weights: Path) -> dict[str, str]:
    """{name not stored: stored name sharing its storage}: the file keeps one name per tied tensor."""
    with safe_open(str(weights), "pt") as f:
        stored = set(f.keys())
    state = model.state_dict()
    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in state.items() if k in stored}
    tied = {}
    for key, tensor in state.items():
        if key not in stored:
            source = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
            if source is None:
                raise RuntimeError(
                    f"the weights file dropped '{key}', which shares no storage with a saved tensor"
                )
            tied[key] = source
    return tied


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, tied: dict[str, str]) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    _write_json(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files, "tied": tied})


# ----------------------------------------------------------------------------- reading


def resolve_checkpoint(where: str | Path, output_dir: str | Path | None = None, verify: bool = True) -> Path:
    """'latest' or 'step-N' (inside `output_dir`), a run folder, or a checkpoint folder -> checked path.

    `verify=False` checks file sizes only, skipping the sha256 of every file (large models).
    """
    where = str(where)
    if where == "latest" or (STEP_NAME.fullmatch(where) and not Path(where).exists()):
        if output_dir is None:
            raise DifflmError(f"cannot resolve checkpoint '{where}' without an output_dir")
        root = checkpoints_dir(output_dir)
        path = root / (read_latest(root) if where == "latest" else where)
    else:
        path = Path(where)
        if (path / "checkpoints" / "latest").is_file():  # a run folder: take its latest
            return resolve_checkpoint("latest", path, verify)
    verify_checkpoint(path, verify)
    return path


def read_latest(root: Path) -> str:
    """The step folder `root/latest` names; anything but `step-N` of an existing folder is refused."""
    latest = root / "latest"
    if not latest.is_file():
        raise DifflmError(f"no checkpoint to resume in {root}: train first, or set train.resume=null")
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = "<binary data>"
    if not STEP_NAME.fullmatch(name):
        raise DifflmError(
            f"{latest} names {name[:40]!r}, not a step folder of {root} (step-N): "
            "write the step to use into it, or pass a step folder"
        )
    return name


def verify_checkpoint(path: Path, hashes: bool = True) -> None:
    if not path.is_dir():
        raise DifflmError(
            f"checkpoint '{path}' not found: pass a step folder, a run folder (its latest step), "
            "RUN/checkpoints/best, or 'latest'"
        )
    for name, size, digest in _manifest_entries(path):
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise DifflmError(
                f"checkpoint '{path}' is truncated or corrupt ({name} differs from its manifest): "
                "resume from an earlier step"
            )
        if hashes and digest is not None and file_sha256(file) != digest:
            raise DifflmError(
                f"checkpoint '{path}' is corrupt ({name} fails its sha256 check): "
                "use an earlier step or a backup copy"
            )


def read_manifest(path: Path) -> dict:
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        raise DifflmError(
            f"checkpoint '{path}' is incomplete (no {MANIFEST_FILE}): resume from an earlier step"
        )
    data = read_json(manifest)
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("tied", {}), dict):
        raise DifflmError(f"{manifest} is malformed (no 'files' mapping): the checkpoint cannot be checked")
    return data


def _manifest_entries(path: Path) -> list[tuple[str, int, str | None]]:
    """(file name, size, sha256 or None) per file; format 1 manifests hold sizes only."""
    entries = []
    for name, entry in read_manifest(path)["files"].items():
        size, digest = (
            (entry, None) if isinstance(entry, int) else (_get(entry, "bytes"), _get(entry, "sha256"))
        )
        if (
            not isinstance(size, int)
            or "/" in name
            or name.startswith(".")
            or digest is not None
            and not isinstance(digest, str)
        ):
            raise DifflmError(
                f"{path / MANIFEST_FILE} is malformed (entry {name!r}): the checkpoint cannot be checked"
            )
        entries.append((name, size, digest))
    return entries


def _get(entry: Any, key: str) -> Any:
    return entry.get(key) if isinstance(entry, dict) else None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DifflmError(f"{path} not found: the checkpoint is incomplete")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DifflmError(f"{path} is not valid JSON ({err}): the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise DifflmError(
            f"{path} must hold a JSON object, got {type(data).__name__}: the checkpoint is corrupt"
        )
    return data


def inference_file(path: Path) -> str:
    """The weights to evaluate and sample with: the EMA when the run kept one, else the raw ones."""
    return EMA_FILE if (path / EMA_FILE).is_file() else MODEL_FILE


def load_weights(model: torch.nn.Module, path: Path, name: str = MODEL_FILE) -> None:
    """Load `path/name` (model.safetensors or ema.safetensors) into `model`: every tensor must match
    by name and shape, no extras.

    The tied names the manifest declares are the only keys allowed to be absent from the file, and
    each must be tied to its declared source in `model`. (Format 1 manifests declare none: the
    model's own ties are used.) Non-finite parameters are refused (buffers may hold -inf masks).
    """
    file = path / name
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DifflmError(f"cannot read weights in '{path}': {err}") from None
    state = model.state_dict()
    manifest = read_manifest(path)
    tied = manifest["tied"] if "tied" in manifest else _model_ties(state, shapes)
    rename = _legacy_renamer(model, shapes, state)
    if rename is not None:
        shapes = {rename(k): v for k, v in shapes.items()}
        tied = {rename(alias): rename(source) for alias, source in tied.items()}
        tied = {**_model_ties(state, shapes), **tied}  # ties the old layout did not have
    _check_keys(path, state, shapes, tied)
    if rename is None:
        load_model(model, str(file), strict=False)
    else:
        model.load_state_dict({rename(k): v for k, v in load_file(str(file)).items()}, strict=False)
    state = model.state_dict()
    for alias, source in tied.items():
        if state[alias].data_ptr() != state[source].data_ptr():
            raise DifflmError(
                f"weights in '{path}' declare '{alias}' tied to '{source}', but the model does not tie them"
            )
    bad = [k for k, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise DifflmError(f"weights in '{path}' hold NaN or inf ({_names(bad)}): use an earlier checkpoint")


def _legacy_renamer(model: torch.nn.Module, stored: dict, state: dict) -> Callable[[str], str] | None:
    """The model's `legacy_keys` renames (regex, replacement), when the file holds names it no longer
    uses: checkpoints written before a model's modules were renamed keep loading."""
    renames = getattr(model, "legacy_keys", ())
    if not renames or all(k in state for k in stored):
        return None

    def rename(key: str) -> str:
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        return key

    return rename


def _check_keys(path: Path, state: dict, shapes: dict, tied: dict[str, str]) -> None:
    missing = sorted(k for k in state if k not in shapes and k not in tied)
    unexpected = sorted(k for k in shapes if k not in state)
    wrong = sorted(k for k in shapes if k in state and shapes[k] != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} of another shape ({k}: {list(shapes[k])} in the file, {list(state[k].shape)} in the model)"
        )
    bad_ties = sorted(a for a, s in tied.items() if a not in state or s not in shapes)
    if bad_ties:
        problems.append(f"tied names that do not exist {_names(bad_ties)}")
    if problems:
        raise DifflmError(
            f"weights in '{path}' do not match the model config: {'; '.join(problems)}; "
            "use the checkpoint's own config, or a complete checkpoint"
        )


def _names(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} tensor(s): {', '.join(keys[:shown])}{more}"


def _model_ties(state: dict, stored: dict) -> dict[str, str]:
    """For format 1 manifests: names absent from the file that share storage with a stored one."""
    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in state.items() if k in stored and t.numel()}
    return {
        k: by_storage[(t.data_ptr(), tuple(t.shape))]
        for k, t in state.items()
        if k not in stored and t.numel() and (t.data_ptr(), tuple(t.shape)) in by_storage
    }


def _save_model_file(model: torch.nn.Module, path: Path) -> None:
    """Each tensor once, under the first name `named_parameters` gives it (a tied LM head is stored
    as the input embedding, as Hugging Face stores it), with the "pt" format tag: transformers 4's
    `from_pretrained` needs both to load the folder."""
    first = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k in first}
    save_file(tensors, str(path), metadata={"format": "pt"})


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
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *json.loads(meta["scalars"]).items()]:
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise DifflmError(
            f"cannot restore the optimizer state in '{path}' ({type(err).__name__}: {err}); "
            "resume with the optimizer settings the run was started with"
        ) from None
