"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

`load_config("recipes/x.yaml", ["model.n_layer=4", "train.max_steps=50"])` returns a `RunConfig`.
Every field is declared once, with its help text in `metadata["help"]` and, where the value is a
name, its valid choices in `metadata["choices"]`. Unknown keys, ill-typed values and invalid
choices are rejected with a message naming the key and what it accepts.

The `model` section is polymorphic: `model.family` picks the dataclass from
`difflm.models.MODEL_CONFIGS`, so each model family keeps its config beside its code.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difflm.errors import DifflmError
from difflm.fields import opt

DEVICE_NAMES = r"auto|cpu|mps|cuda(:\d+)?"
MAX_INT = 2**63 - 1  # every int in a config fits a C int64 (seeds, steps, sizes)


def check_range(
    key: str,
    value: float | None,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """Raise unless `low <= value <= high` (strict where `open_*`); None passes (optional fields)."""
    if value is None:
        return
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = (
            f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
        )
        raise DifflmError(f"{key} must be in {interval}, got {value}")


@dataclass
class DataConfig:
    path: str = opt(
        "shakespeare", "A corpus name (see `difflm data list`), a file, a folder, or an HF dataset name."
    )
    format: str = opt(
        "auto",
        "How to read `path`.",
        choices=("auto", "text", "lines", "folder", "jsonl", "parquet", "arrow", "hub"),
    )
    field: str | None = opt(None, "Text field of JSONL/Parquet/Arrow records (auto-detected when null).")
    split: str = opt("train", "Split of an Arrow DatasetDict or HF dataset.")
    tokenizer: str = opt("char", "'char' for a character-level tokenizer, else an HF tokenizer path or name.")
    block_size: int = opt(256, "Tokens per training sequence (packed blocks).")
    val_fraction: float = opt(
        0.1, "Fraction of tokens held out for validation (the last ones, nanoGPT style)."
    )
    append_eos: bool = opt(False, "Append an end-of-sequence token after each document when packing.")
    cache_dir: str = opt(".cache/difflm", "Where packed token files are cached between runs.")
    extra_train: list = opt(
        [],
        "More text for training only (files or corpus names, read like `path`): packed into blocks "
        "added to the training split; validation stays `path`'s, the tokenizer is built from `path`.",
    )

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise DifflmError(f"data.block_size must be >= 2, got {self.block_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DifflmError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not all(isinstance(extra, str) and extra for extra in self.extra_train):
            raise DifflmError(f"data.extra_train must be a list of paths, got {self.extra_train!r}")


@dataclass
class DiffusionConfig:
    schedule: str = opt(
        "linear",
        "Masking-rate schedule p(t).",
        choices=("linear", "cosine", "power", "sigmoid", "loglinear"),
    )
    schedule_params: dict = opt({}, "Extra schedule parameters, e.g. {exponent: 2.0} for 'power'.")
    noise: str = opt(
        "mask", "Corruption: replace by the mask token or by a random token.", choices=("mask", "random")
    )
    min_rate: float = opt(0.0, "Lower bound on the masking rate of a training example.")
    span_prob: float = opt(
        0.0, "Probability that an example is corrupted in a contiguous span instead of iid."
    )
    random_length_prob: float = opt(
        0.0, "Probability of truncating a batch to a random length (LLaDA uses 0.01)."
    )
    loss: str = opt(
        "elbo",
        "Masked-diffusion loss: elbo (CE on the masked tokens weighted by w(t), over B*L: LLaDA's "
        "pre-training), dllm, soft_ce, sft (per answer length), mdlm (elbo with MDLM's SUBS).",
        choices=("elbo", "dllm", "soft_ce", "sft", "mdlm"),
        aliases={"guidelines": "elbo"},  # its name until 2026-11; zoo/ checkpoints store it
    )
    reweight_cap: float | None = opt(None, "Cap on the 1/t-type ELBO weight (null = no cap).")
    draw: str = opt(
        "time",
        "How training noise is drawn: time (t in [t_eps, t_max], each token masked with p(t), weight w(t)) "
        "or count (each block, or sequence, masks m of its n tokens, m uniform on 1..n, weight n/m: the "
        "same ELBO with bounded weights).",
        choices=("time", "count"),
    )
    antithetic: bool = opt(True, "Stratified (antithetic) draw of t (or of the counts) across the batch.")
    t_eps: float = opt(1e-3, "Smallest t drawn, keeping the 1/t weight finite.")
    t_max: float = opt(
        1.0, "Largest t drawn in training; with t_eps, BD3-LM's clipped schedule (eval always uses t_max=1)."
    )
    block_length: int | None = opt(
        None,
        "Block diffusion (BD3-LM): denoise blocks of this many tokens given the clean earlier blocks, "
        "noisy and clean copies in one forward (null = full-sequence masked diffusion; 1 = next-token-like).",
    )
    decode_block: int | None = opt(
        None,
        "Train a full-sequence model on what semi-autoregressive decoding in blocks of this many tokens "
        "feeds it: per sequence one block on the grid P, P + N, ... (P = decode_offset), the text before "
        "it clean, the text after it all masks, the loss on the block (a fine-tune for fast decoding; "
        "null = every position).",
    )
    decode_offset: int = opt(
        0, "With decode_block: where its grid starts, the prompt length decoding will use."
    )

    def __post_init__(self) -> None:
        for key in ("min_rate", "span_prob", "random_length_prob"):
            check_range(f"diffusion.{key}", getattr(self, key), 0.0, 1.0)
        check_range("diffusion.t_eps", self.t_eps, 0.0, 1.0, open_low=True, open_high=True)
        check_range("diffusion.reweight_cap", self.reweight_cap, 0.0, open_low=True)
        check_range("diffusion.t_max", self.t_max, self.t_eps, 1.0, open_low=True)
        check_range("diffusion.block_length", self.block_length, 1)
        check_range("diffusion.decode_block", self.decode_block, 1)
        check_range("diffusion.decode_offset", self.decode_offset, 0)
        if self.block_length is not None and self.decode_block is not None:
            raise DifflmError(
                "diffusion.decode_block is for full-sequence models; block diffusion (block_length) "
                "already trains each block given the clean ones before it: set one of the two"
            )
        if self.decode_offset and self.decode_block is None:
            raise DifflmError(
                "diffusion.decode_offset places decode_block's grid: set diffusion.decode_block too"
            )
        if self.decode_block is not None and self.random_length_prob > 0:
            raise DifflmError(
                "diffusion.decode_block trains on the decode's fixed block grid, which random truncation "
                "moves: set diffusion.random_length_prob=0"
            )
        if self.draw == "count":
            self._check_count_draw()
        if self.block_length is not None and self.span_prob > 0:
            raise DifflmError("diffusion.block_length (block diffusion) needs diffusion.span_prob=0")

    def _check_count_draw(self) -> None:
        timed = {"t_max": self.t_max != 1.0, "min_rate": self.min_rate > 0, "span_prob": self.span_prob > 0}
        for key, is_set in timed.items():
            if is_set:
                raise DifflmError(f"diffusion.draw=count draws counts, not times: reset diffusion.{key}")
        if self.noise != "mask" or self.decode_block is not None:
            raise DifflmError("diffusion.draw=count needs diffusion.noise=mask and no diffusion.decode_block")


@dataclass
class LoraConfig:
    r: int = opt(0, "LoRA rank: 0 trains every weight; > 0 freezes the model and trains adapters (peft).")
    alpha: float = opt(16.0, "LoRA scale numerator: the update is (alpha / r) * B @ A.")
    dropout: float = opt(0.0, "Dropout on the adapters' input.")
    target_modules: list = opt(
        [], "Linear layers to adapt, by name suffix (empty = the model family's attention projections)."
    )

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise DifflmError(
                f"train.lora needs r >= 0, alpha > 0 and dropout in [0, 1); got {self.r}, {self.alpha}, {self.dropout}"
            )


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/default", "Folder for checkpoints and logs.")
    max_steps: int = opt(1000, "Optimizer steps to train for.")
    batch_size: int = opt(64, "Global batch size (sequences per optimizer step, across all processes).")
    grad_accum: int = opt(
        1, "Micro-batches per optimizer step (each process); batch_size must divide evenly."
    )
    lr: float = opt(1e-3, "Peak learning rate.")
    min_lr: float = opt(1e-4, "Learning rate at the end of decay.")
    warmup_steps: int = opt(100, "Linear warmup steps.")
    decay: str = opt("cosine", "Learning-rate decay after warmup.", choices=("cosine", "linear", "constant"))
    optimizer: str = opt(
        "adamw", "Optimizer (8-bit ones need bitsandbytes).", choices=("adamw", "adamw8bit", "lion8bit")
    )
    weight_decay: float = opt(0.1, "Decoupled weight decay (matrices only, not norms or biases).")
    beta1: float = opt(0.9, "Adam beta1.")
    beta2: float = opt(0.99, "Adam beta2.")
    grad_clip: float = opt(1.0, "Gradient-norm clipping (0 = off).")
    precision: str = opt(
        "fp32",
        "Autocast precision (fp16 adds a dynamic loss scale, kept in checkpoints).",
        ("fp32", "bf16", "fp16"),
    )
    device: str = opt("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    strategy: str = opt(
        "ddp",
        "Several processes (torchrun): ddp (a full replica each) or fsdp (FSDP2: weights, grads and "
        "optimizer state sharded; sharded checkpoints).",
        choices=("ddp", "fsdp"),
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "Low-rank adapters instead of full fine-tuning."}
    )
    seed: int = opt(1337, "Seed of data order, noise and init.")
    length_grouping: int = opt(
        0,
        "Batch items of similar length together: sort each run of N batches of the shuffled order by "
        "length, then shuffle the batches (less padding; needs a dataset with per-item lengths, "
        "e.g. SGDD's; 0 = off).",
    )
    eval_every: int = opt(250, "Evaluate the val loss every N steps (0 = only at the end).")
    eval_batches: int = opt(20, "Val batches per evaluation.")
    log_every: int = opt(10, "Log train metrics every N steps.")
    save_every: int = opt(500, "Checkpoint every N steps and at the end (0 = only at the end).")
    keep_last: int = opt(3, "Checkpoints to keep (0 = keep all).")
    keep_best: bool = opt(
        False, "Write the model to checkpoints/best/ whenever the periodic val loss improves."
    )
    patience: int = opt(
        0, "Stop after this many evaluations without a better val loss, with a checkpoint (0 = off)."
    )
    ema: float = opt(
        0.0,
        "Decay of an exponential moving average of the weights (e.g. 0.9999; 0 = off): validation "
        "and the inference weights (ema.safetensors) use it.",
    )
    compile: bool = opt(False, "torch.compile the model for training (pays on GPUs, rarely on CPUs).")
    peak_tflops: float = opt(
        0.0,
        "Peak TFLOP/s of one device, for the MFU in the log (0 = look the CUDA GPU up; none on CPU).",
    )
    resume: str | None = opt(None, "'latest', a step folder name like 'step-500', or a checkpoint path.")
    init_from: str | None = opt(
        None,
        "Start from the weights of this checkpoint (a run or step folder of the same architecture; "
        "optimizer and step start fresh), e.g. an AR run's weights for a bidirectional diffusion run.",
    )
    overwrite: bool = opt(
        False,
        "Train into an output_dir that holds another run, moving that run aside to {output_dir}.old-TIME.",
    )
    stop_at_step: int | None = opt(
        None, "Exit cleanly after this step with a checkpoint, leaving the schedule as for max_steps."
    )
    log_to: list = opt([], "Extra loggers: 'tensorboard' and/or 'wandb' (when installed).")
    progress: bool = opt(True, "Show a progress bar with loss and tokens/s.")

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise DifflmError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise DifflmError(
                f"train.batch_size ({self.batch_size}) must be a positive multiple of train.grad_accum ({self.grad_accum})"
            )
        check_range("train.lr", self.lr, 0.0, open_low=True)
        for key in (
            "min_lr",
            "weight_decay",
            "grad_clip",
            "warmup_steps",
            "eval_every",
            "save_every",
            "keep_last",
            "patience",
            "peak_tflops",
            "length_grouping",
        ):
            check_range(f"train.{key}", getattr(self, key), 0)
        for key in ("beta1", "beta2"):
            check_range(f"train.{key}", getattr(self, key), 0.0, 1.0, open_high=True)
        for key in ("log_every", "eval_batches", "stop_at_step"):
            check_range(f"train.{key}", getattr(self, key), 1)
        check_range("train.seed", self.seed, 0)
        check_range("train.ema", self.ema, 0.0, 1.0, open_high=True)
        if self.patience and not self.eval_every:
            raise DifflmError("train.patience counts periodic evaluations: set train.eval_every > 0")
        if not re.fullmatch(DEVICE_NAMES, self.device):
            raise DifflmError(
                f"train.device={self.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
            )
        if self.lora.r and self.strategy == "fsdp":
            raise DifflmError("train.lora with train.strategy=fsdp is not supported: use train.strategy=ddp")
        for key in ("ema", "keep_best"):
            if getattr(self, key) and self.strategy == "fsdp":
                raise DifflmError(
                    f"train.{key} with train.strategy=fsdp is not supported: use train.strategy=ddp"
                )
        for name in self.log_to:
            if name not in ("tensorboard", "wandb"):
                raise DifflmError(f"train.log_to: unknown logger '{name}'; choose from tensorboard, wandb")


@dataclass
class RunConfig:
    task: str = opt(
        "masked_diffusion", "What to train: the loss and batches (see difflm.systems.registry.SYSTEMS)."
    )
    model: Any = opt(None, "Model section; `family` picks the model and its config dataclass.")
    data: DataConfig = opt(DataConfig(), "Data section.")
    diffusion: DiffusionConfig = opt(DiffusionConfig(), "Masked diffusion.")
    train: TrainConfig = opt(TrainConfig(), "Optimization and checkpoints.")
    system: dict = opt(
        {}, "System-specific settings, typed by the system's own dataclass (see `system_config`)."
    )


def system_config(cfg: RunConfig, cls: type) -> Any:
    """Parse the `system` section into a system's own dataclass (unknown keys and bad types rejected)."""
    return from_dict(cls, cfg.system, "system.")


# ----------------------------------------------------------------------------- building


def _choices_of(f: dataclasses.Field) -> tuple | None:
    return f.metadata.get("choices")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DifflmError:
                pass
        raise DifflmError(
            f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    if tp is Any:
        return value
    expected = origin or tp
    if expected is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DifflmError(f"config key '{key}' must be a finite number, got {value}")
        return float(value)
    if expected is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise DifflmError(f"config key '{key}' is {value}, beyond the int64 range; use a smaller value")
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise DifflmError(
            f"config key '{key}' expects {_type_name(expected)}, got {value!r} ({type(value).__name__})"
        )
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise DifflmError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise DifflmError(f"unknown config key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{dotted}.")
            continue
        value = _coerce(value, tp, dotted)
        if isinstance(value, str):  # a renamed choice under its old name
            value = fields[key].metadata.get("aliases", {}).get(value, value)
        choices = _choices_of(fields[key])
        if choices and value not in choices:
            raise DifflmError(
                f"config key '{dotted}' is {value!r}; valid choices: {', '.join(map(str, choices))}"
            )
        kwargs[key] = value
    return cls(**kwargs)


def build_model_config(data: dict) -> Any:
    """Pick the model config dataclass by `family` (see difflm.models.MODEL_CONFIGS)."""
    from difflm.models import DERIVED, MODEL_CONFIGS

    if not isinstance(data, dict):
        raise DifflmError(f"config section 'model' must be a mapping (family: ..., ...), got {data!r}")
    data = dict(data)
    family = data.pop("family", "transformer")
    if family not in MODEL_CONFIGS:
        raise DifflmError(
            f"config key 'model.family' is {family!r}; valid choices: {', '.join(MODEL_CONFIGS)}"
        )
    derived = DERIVED.get(family, {})
    return from_dict(MODEL_CONFIGS[family], {**derived, **data}, "model.")


def model_family(model_cfg: Any) -> str:
    from difflm.models import MODEL_CONFIGS

    for family, cls in MODEL_CONFIGS.items():
        if type(model_cfg) is cls:
            return family
    raise DifflmError(f"no model family is registered for {type(model_cfg).__name__}")


def config_from_dict(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise DifflmError(f"a run config must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    model = data.pop("model", None)
    model = build_model_config({} if model is None else model)
    cfg = from_dict(RunConfig, data)
    cfg.model = model
    return cfg


# Defaults that changed: a saved config without the key was written under the old default.
SAVED_DEFAULTS = {"dfgpt": {"positions": "learned"}}  # rope became the default on 2026-11-30


def saved_config_from_dict(data: dict) -> RunConfig:
    """`config_from_dict` for a checkpoint's difflm.json, filling keys added since with their old defaults."""
    model = dict(data.get("model") or {})
    for key, old in SAVED_DEFAULTS.get(model.get("family", "transformer"), {}).items():
        model.setdefault(key, old)
    return config_from_dict({**data, "model": model})


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (YAML/JSON-safe) of a run config, with `model.family` first."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "model":
            out["model"] = {"family": model_family(value), **dataclasses.asdict(value)}
        elif dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)
        else:
            out[f.name] = value
    return _plain(out)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- files and overrides


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (4, 1e-3, true, null)."""
    if "=" not in override:
        raise DifflmError(f"override '{override}' is not of the form key=value (e.g. model.n_layer=4)")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DifflmError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DifflmError(f"recipe '{path}' not found; see recipes/ for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DifflmError(f"recipe '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DifflmError(f"recipe '{path}' must be a mapping of sections (model, data, train, ...)")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml(path) if path else {}
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, type, default, choices and help (for --help-config)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        choices = f" {{{', '.join(map(str, _choices_of(f)))}}}" if _choices_of(f) else ""
        lines.append(f"{prefix}{f.name} = {default!r}{choices}  -- {f.metadata.get('help', '')}")
    return lines


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
