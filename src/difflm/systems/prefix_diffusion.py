"""Prefix diffusion: a masked LM (HF BERT/RoBERTa or our transformer) fine-tuned to fill text
after a clean prefix, and the matching autoregressive baseline on the same documents.

System `prefix_diffusion` (the seed's recipe). Documents (one poem each, or packed text blocks)
keep their first `system.prefix_len` tokens clean; the rest is masked by one of two noises:
- `discrete` (default, the seed's collator): per batch one rate p from the table 1.0, 0.9, ..., 0.1,
  every maskable token masked with probability p (`difflm.data.prefix.PrefixCollator`, applied
  in `prepare` to the fixed-length batch with the step's generator). Loss (`system.loss`):
  `mean` = plain mean CE over masked tokens (the seed), or `elbo` = CE / p summed over masked
  tokens and divided by B*L (LLaDA's estimator); both through `difflm.diffusion.losses.elbo_loss`.
- `elbo`: the core's continuous schedule (`MaskedDiffusionObjective`, `diffusion:` section), the prefix
  protected through `prompt_lengths`.
Special tokens (EOS/[SEP], [PAD], ...) and padding are never masked.

System `poems_ar`: our transformer in causal mode, next-token loss on the same padded documents
(one poem per row, EOS-terminated), so both models see exactly the same tokens.

Data: `data.path` is a poem split folder written by `difflm data build-poems` (train.jsonl is
trained on, dev.jsonl validates; test.jsonl is left to the benchmark) or any text source, packed
into blocks (`text_blocks`). With `data.tokenizer: char` on a poem split the character vocabulary
is built from the texts of all three split files: test poems hold characters absent from train,
and a char tokenizer has no [UNK]; those characters' embeddings stay untrained. The `mlm` family
brings its own tokenizer (`data.tokenizer` is ignored). Documents are `encode(text) + [EOS]`
(EOS is [SEP] for BERT-style tokenizers), truncated to `data.block_size`; prompts are `encode`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difflm.config import RunConfig, model_family, opt, system_config
from difflm.data.blocks import text_blocks
from difflm.data.poems import SPLITS, load_split
from difflm.data.prefix import DEFAULT_RATES, IGNORE_INDEX, PrefixCollator
from difflm.data.tokenizers import CharTokenizer, HFTokenizer, Tokenizer, build_tokenizer
from difflm.diffusion.losses import elbo_loss
from difflm.errors import DifflmError
from difflm.evaluate.options import EvalOptions
from difflm.models import build_model
from difflm.models.layers import padding_bias
from difflm.models.mlm import hf_config_dict, load_mlm
from difflm.pretrained import Pretrained
from difflm.systems.text import fill_derived
from difflm.train.objectives import AutoregressiveObjective, MaskedDiffusionObjective
from difflm.train.trainer import Run

Batch = dict[str, Tensor]


@dataclass
class PrefixDiffusionConfig:
    """The `system:` section of a prefix_diffusion run."""

    prefix_len: int = opt(16, "Leading tokens of every document that are never masked (the prompt).")
    noise: str = opt(
        "discrete",
        "discrete: one rate per batch from `rates` (the seed); elbo: the diffusion: schedule.",
        choices=("discrete", "elbo"),
    )
    rates: list = opt(list(DEFAULT_RATES), "Masking rates drawn per batch (discrete noise), each in (0, 1].")
    loss: str = opt(
        "mean",
        "discrete noise: mean = plain mean CE over masked tokens (seed); elbo = CE/p summed, / (B*L).",
        choices=("mean", "elbo"),
    )

    def __post_init__(self) -> None:
        if self.prefix_len < 0:
            raise DifflmError(f"system.prefix_len must be >= 0, got {self.prefix_len}")
        if not self.rates or any(not 0.0 < float(r) <= 1.0 for r in self.rates):
            raise DifflmError(f"system.rates {self.rates} must be non-empty, each in (0, 1]")


# ----------------------------------------------------------------------------- data


class Documents:
    """Token-id documents right-padded to one length: items {input_ids, attention_mask} [L]."""

    def __init__(self, docs: list[list[int]], length: int, pad_id: int) -> None:
        if not docs:
            raise DifflmError("no documents to train on; check the data path")
        self.ids = torch.full((len(docs), length), pad_id, dtype=torch.long)  # [N, L]
        self.mask = torch.zeros((len(docs), length), dtype=torch.long)  # [N, L]
        for i, doc in enumerate(docs):
            doc = doc[:length]
            self.ids[i, : len(doc)] = torch.tensor(doc, dtype=torch.long)
            self.mask[i, : len(doc)] = 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Batch:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def is_poem_split(path: str | Path) -> bool:
    return (Path(path) / "split.json").is_file()


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One training document: the text's ids then EOS (when the tokenizer has one)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return tokenizer.encode(text) + eos


def poem_tokenizer(split_dir: str | Path, spec: str) -> Tokenizer:
    """'char': a vocabulary over all split texts (see the module docstring); else an HF tokenizer."""
    if spec != "char":
        return build_tokenizer(spec)
    return CharTokenizer.from_texts(text for name in SPLITS for text in load_split(split_dir, name))


def run_data(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, object, object]:
    """(tokenizer, train, val): padded poems from a split folder, else packed text blocks."""
    if not is_poem_split(cfg.data.path):
        return text_blocks(cfg.data, tokenizer)
    tokenizer = tokenizer or poem_tokenizer(cfg.data.path, cfg.data.tokenizer)
    length = cfg.data.block_size
    train, val = (
        Documents(
            [document_ids(tokenizer, t) for t in load_split(cfg.data.path, name)],
            length,
            tokenizer.pad_token_id,
        )
        for name in ("train", "dev")
    )
    return tokenizer, train, val


def trim_padding(batch: Batch) -> Batch:
    """Drop the columns that are padding in every row (saves compute on short poems)."""
    if "attention_mask" not in batch:
        return batch
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if torch.is_tensor(v) and v.dim() >= 2 else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- tasks


class PrefixDiffusionObjective:
    """Corrupt after a clean prefix (discrete rate table or the core's ELBO schedule); CE on masks."""

    def __init__(self, cfg: RunConfig, scfg: PrefixDiffusionConfig, tokenizer: Tokenizer) -> None:
        special = sorted(tokenizer.special_ids | {tokenizer.pad_token_id})
        self.scfg = scfg
        self.collator = PrefixCollator(
            tokenizer.pad_token_id,
            tokenizer.mask_token_id,
            special,
            prefix_len=scfg.prefix_len,
            rates=scfg.rates,
            max_length=cfg.data.block_size,
        )
        self.elbo = None
        if scfg.noise == "elbo":
            self.elbo = MaskedDiffusionObjective(
                cfg.diffusion,
                mask_token_id=tokenizer.mask_token_id,
                vocab_size=tokenizer.vocab_size,
                special_ids=special,
            )

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        batch = trim_padding(batch)
        ids = batch["input_ids"]  # [B, L]
        if self.elbo is not None:
            prefix = torch.full((ids.shape[0],), self.scfg.prefix_len, dtype=torch.long)  # [B]
            return self.elbo.prepare({**batch, "prompt_lengths": prefix}, generator)
        real = batch.get("attention_mask", torch.ones_like(ids))  # [B, L]
        rows = [row[: int(n)].tolist() for row, n in zip(ids, real.sum(1), strict=True)]
        out = self.collator(rows, generator)  # padded to the longest row, like trim_padding
        noised = out["labels"] != IGNORE_INDEX  # [B, L]
        clean = torch.where(noised, out["labels"], out["input_ids"])  # [B, L]
        B, L = clean.shape
        if self.scfg.loss == "mean":  # elbo_loss divides by B*L: this makes it sum / n_masked
            weight = torch.full((B,), B * L / max(1, int(noised.sum())))
        else:
            weight = torch.full((B,), 1.0 / float(out["rate"]))
        return {
            "input_ids": clean,
            "noisy": out["input_ids"],
            "noised": noised,
            "attention_mask": out["attention_mask"],
            "weight": weight,  # [B]
            "rate": out["rate"].expand(B),  # [B]
        }

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        if self.elbo is not None:
            return self.elbo.loss(model, batch)
        real = batch["attention_mask"]
        bias = None if bool(real.all()) else padding_bias(real)
        logits = model(batch["noisy"], attention_bias=bias)  # [B, L, V]
        loss = elbo_loss(logits, batch["input_ids"], batch["noised"], batch["weight"])
        return loss, {"mask_rate": batch["rate"].float().mean().item()}


class DocumentARObjective(AutoregressiveObjective):
    """Next-token loss on padded documents, padding-only columns trimmed first."""

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        return trim_padding(batch)


# ----------------------------------------------------------------------------- systems


def _check_lengths(cfg: RunConfig, scfg: PrefixDiffusionConfig) -> None:
    if scfg.prefix_len >= cfg.data.block_size:
        raise DifflmError(
            f"system.prefix_len {scfg.prefix_len} is not shorter than data.block_size {cfg.data.block_size}: "
            "nothing is left to mask; lower prefix_len or raise block_size"
        )


def _mlm_run(cfg: RunConfig) -> tuple[nn.Module, Tokenizer, object, object]:
    model, hf_tokenizer = load_mlm(cfg.model.name_or_path)
    tokenizer = HFTokenizer(hf_tokenizer)
    limit = model.max_length  # RoBERTa-style tables lose padding_idx + 1 rows to the position offset
    if cfg.data.block_size > limit:
        raise DifflmError(
            f"data.block_size {cfg.data.block_size} exceeds {cfg.model.name_or_path}'s "
            f"{limit} positions; lower data.block_size"
        )
    tokenizer, train, val = run_data(cfg, tokenizer)
    cfg.model = dataclasses.replace(
        cfg.model, mask_token_id=tokenizer.mask_token_id, hf_config=_json_safe(hf_config_dict(model))
    )
    return model, tokenizer, train, val


def _json_safe(data: dict) -> dict:
    return json.loads(json.dumps(data, default=str))


def build_prefix_diffusion(cfg: RunConfig) -> Run:
    scfg = system_config(cfg, PrefixDiffusionConfig)
    _check_lengths(cfg, scfg)
    family = model_family(cfg.model)
    if family == "mlm":
        model, tokenizer, train, val = _mlm_run(cfg)
    elif family == "transformer":
        tokenizer, train, val = run_data(cfg)
        fill_derived(cfg, tokenizer, causal=False)
        model = build_model("transformer", cfg.model)
    else:
        raise DifflmError(f"task 'prefix_diffusion' trains model.family mlm or transformer, got {family}")
    return Run(model, PrefixDiffusionObjective(cfg, scfg, tokenizer), train, val, tokenizer)


def build_poems_ar(cfg: RunConfig) -> Run:
    if model_family(cfg.model) != "transformer":
        raise DifflmError(f"task 'poems_ar' trains model.family=transformer, got {model_family(cfg.model)}")
    tokenizer, train, val = run_data(cfg)
    fill_derived(cfg, tokenizer, causal=True)
    return Run(build_model("transformer", cfg.model), DocumentARObjective(), train, val, tokenizer)


def eval_prefix_system(pre: Pretrained, opts: EvalOptions) -> dict:
    """`difflm eval CKPT` for prefix_diffusion / poems_ar: the training loss on the validation set."""
    from difflm.train.trainer import evaluate_loss

    cfg = pre.config
    _, _, val = run_data(cfg, pre.tokenizer)
    if cfg.task == "poems_ar":
        objective = DocumentARObjective()
    else:
        objective = PrefixDiffusionObjective(cfg, system_config(cfg, PrefixDiffusionConfig), pre.tokenizer)
    tc = dataclasses.replace(cfg.train, batch_size=opts.batch_size, precision="fp32")
    batches = opts.max_batches or max(1, len(val) // opts.batch_size)
    return {"val_loss": evaluate_loss(pre.model, objective, val, tc, batches=batches)}
