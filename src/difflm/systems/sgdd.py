"""The SGDD system: sentence vectors in, text out (phase 1 reconstruct, phase 2 paraphrase).

Data. Phase 1 reads texts from any foundation source (`data.path`, `data.format`: a file of one
sentence per line with format `lines`, JSONL / Parquet, an Arrow folder from `save_to_disk` as in
the seed's BookCorpus layout); texts holding newlines are split into lines, duplicates dropped.
Phase 2 reads pairs: JSONL `{"source", "target"}` or TSV `source<TAB>target`. A seeded held-out
set (`system.holdout`) is the validation split and what `difflm eval` scores; it is drawn before
anything else, so eval can rebuild it from the checkpoint's config alone.

Each example is the target's WordPiece ids (no [CLS]/[SEP]; longer than `model.block_size` =
max_token_length: truncated, with one warning counting them) right-padded with [PAD], and the
frozen encoder's vector of the source. Vectors of a fixed corpus are computed once with
`cached_encode` (texts sorted by length so batches carry little padding), so later epochs and
later runs never re-run the encoder.

Training is the core's `MaskedDiffusionObjective` (cosine schedule, t on the grid k/1000, CE on
masked real tokens only, per-token normalisation through the `sft` loss with no prompt) wrapped
by `SGDDObjective`, which trims all-pad columns, drops the vector for `uncond_prob` of the examples
(classifier-free guidance) and adds the VIB KL and the length head's cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from difflm.config import RunConfig, model_family, opt, saved_config_from_dict, system_config
from difflm.data.sources import iter_decoded_lines, iter_texts, read_jsonl_records
from difflm.data.tokenizers import HFTokenizer
from difflm.errors import DifflmError
from difflm.models.encoder import EncoderConfig, SemanticEncoder, Whitening, cached_encode
from difflm.models.sgdd import SGDD
from difflm.sampling.settings import REMASKING, REVEAL_SCHEDULES
from difflm.train import checkpoint as ckpt
from difflm.train.objectives import MaskedDiffusionObjective
from difflm.train.trainer import Run

PHASES = ("reconstruct", "paraphrase")
_ENCODERS: dict[str, SemanticEncoder] = {}


@dataclasses.dataclass
class SGDDSystemConfig:
    phase: str = opt("reconstruct", "reconstruct: text -> same text; paraphrase: source -> target.", PHASES)
    init_from: str | None = opt(
        None, "Checkpoint (step or run folder) whose weights start this run (phase 2)."
    )
    extra_data: str | None = opt(
        None,
        "More training examples from another file (one sentence a line, or JSONL / TSV pairs for phase 2); "
        "the held-out split is still drawn from data.path alone, and texts in it are dropped from these.",
    )
    holdout: int = opt(
        500, "Examples (texts or pairs) held out, seeded: the val split and `difflm eval`'s set."
    )
    split_seed: int = opt(0, "Seed of the held-out draw.")
    max_examples: int = opt(0, "Use only the first N texts / pairs of the source (0 = all).")
    uncond_prob: float = opt(
        0.1, "Share of examples trained without their vector (CFG's unconditional model)."
    )
    num_steps: int = opt(1000, "Discrete diffusion steps: t is drawn on the grid k / num_steps.")
    length_loss_weight: float = opt(0.1, "Weight of the length head's cross-entropy.")
    both_directions: bool = opt(True, "Phase 2: also train target -> source.")
    encode_batch_size: int = opt(128, "Texts per encoder batch when embedding the corpus.")
    sample_steps: int = opt(16, "Unmasking steps at sampling (MaskGIT).")
    cfg_scale: float = opt(2.0, "Guidance w at sampling: cond + w * (cond - uncond); 0 = off.")
    shortlist: int = opt(
        64,
        "Decode from a shortlist: one forward first keeps each position's k most likely tokens, and "
        "every step scores only their union instead of the whole vocabulary (0 = whole vocabulary; "
        "64 halved the time per sentence at batch 1 with the same held-out figures, docs/results/sgdd).",
    )
    reveal_schedule: str = opt("cosine", "Tokens revealed per step.", REVEAL_SCHEDULES)
    remasking: str = opt("low_confidence", "Which positions to reveal first.", REMASKING)

    def __post_init__(self) -> None:
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise DifflmError(f"system.uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if self.cfg_scale < 0:
            raise DifflmError(f"system.cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}")
        for key in ("holdout", "max_examples", "length_loss_weight", "shortlist"):
            if getattr(self, key) < 0:
                raise DifflmError(f"system.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("num_steps", "sample_steps", "encode_batch_size"):
            if getattr(self, key) < 1:
                raise DifflmError(f"system.{key} must be >= 1, got {getattr(self, key)}")


def load_encoder(config: EncoderConfig) -> SemanticEncoder:
    """The frozen encoder for `config`, loaded once per process (it is never trained or saved).

    Keyed by the fields the encoder itself reads; VIB / whitening settings belong to the head.
    """
    fields = dataclasses.asdict(config)
    key = json.dumps({k: fields[k] for k in ("name_or_path", "pooling", "normalize", "max_length")})
    if key not in _ENCODERS:
        _ENCODERS[key] = SemanticEncoder(config)
    return _ENCODERS[key]


# ----------------------------------------------------------------------------- data


def read_texts(cfg: RunConfig, limit: int = 0) -> list[str]:
    """Unique non-blank lines of the source, in order."""
    seen: dict[str, None] = {}
    for chunk in iter_texts(
        cfg.data.path, format=cfg.data.format, field=cfg.data.field, split=cfg.data.split
    ):
        for line in chunk.splitlines():
            if line.strip():
                seen.setdefault(line.strip(), None)
        if limit and len(seen) >= limit:
            break
    return list(seen)[: limit or None]


def read_pairs(path: str, limit: int = 0) -> list[tuple[str, str]]:
    """Unique (source, target) pairs from JSONL or TSV; pairs with a blank side are skipped."""
    file = Path(path).expanduser()
    if file.suffix.lower() in (".tsv", ".txt"):
        rows = [line.rstrip("\r\n").split("\t") for _, line in iter_decoded_lines(file)]
        if any(len(row) < 2 for row in rows if any(cell.strip() for cell in row)):
            raise DifflmError(f"{file}: every line needs source<TAB>target; fix the file or use JSONL")
        raw = [(row[0], row[1]) for row in rows if len(row) >= 2]
    else:
        raw = []
        for record in read_jsonl_records(file):
            if "source" not in record or "target" not in record:
                raise DifflmError(f"{file}: records need 'source' and 'target' keys, got {sorted(record)}")
            raw.append((str(record["source"] or ""), str(record["target"] or "")))
    pairs = list(dict.fromkeys((s.strip(), t.strip()) for s, t in raw if s.strip() and t.strip()))
    if len(pairs) < len(raw):
        warnings.warn(f"{file}: dropped {len(raw) - len(pairs)} blank or duplicate pairs", stacklevel=2)
    return pairs[: limit or None]


def read_examples(cfg: RunConfig, scfg: SGDDSystemConfig) -> list[tuple[str, str]]:
    """(source, target) per example; source == target in phase 1."""
    if scfg.phase == "paraphrase":
        return read_pairs(cfg.data.path, scfg.max_examples)
    return [(text, text) for text in read_texts(cfg, scfg.max_examples)]


def read_file_examples(path: str) -> list[tuple[str, str]]:
    """Examples to score from a user's file: JSONL or TSV pairs (`read_pairs`), or any other file
    as one sentence a line, each its own target (phase 1)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DifflmError(f"--data {path}: no such file; give one sentence a line, or JSONL pairs")
    if file.suffix.lower() in (".jsonl", ".tsv"):
        pairs = read_pairs(str(file))
    else:
        lines = (line.strip() for _, line in iter_decoded_lines(file))
        pairs = [(text, text) for text in dict.fromkeys(line for line in lines if line)]
    if not pairs:
        raise DifflmError(f"--data {path} holds no examples: one sentence a line, or JSONL pairs")
    return pairs


def split_holdout(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of a seeded permutation; both sorted."""
    if not 0 < holdout < n:
        raise DifflmError(
            f"system.holdout={holdout} must be in (0, {n}) for {n} examples: lower it or add data"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[holdout:]), sorted(order[:holdout])


def split_examples(cfg: RunConfig, split: str = "val") -> list[tuple[str, str]]:
    """The held-out ("val") or training ("train", one direction) pairs of a run, from its config."""
    scfg = system_config(cfg, SGDDSystemConfig)
    examples = read_examples(cfg, scfg)
    train, held = split_holdout(len(examples), scfg.holdout, scfg.split_seed)
    return [examples[i] for i in (held if split == "val" else train)]


def tokenize_targets(tokenizer: HFTokenizer, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, max_len] and lengths [N]; longer texts truncated with one warning."""
    encoded = tokenizer.tok(texts, add_special_tokens=False)["input_ids"]
    n_long = sum(len(ids) > max_len for ids in encoded)
    if n_long:
        warnings.warn(
            f"{n_long} of {len(texts)} texts are longer than max_token_length={max_len} tokens and were "
            "truncated: raise model.block_size to keep them whole",
            stacklevel=2,
        )
    ids = torch.full((len(texts), max_len), tokenizer.pad_token_id, dtype=torch.long)
    lengths = torch.zeros(len(texts), dtype=torch.long)
    for row, seq in enumerate(encoded):
        seq = seq[:max_len]
        if not seq:
            raise DifflmError(f"text {texts[row]!r} has no tokens: remove it from the data")
        ids[row, : len(seq)] = torch.tensor(seq)
        lengths[row] = len(seq)
    return ids, lengths


def encode_corpus(encoder: SemanticEncoder, texts: list[str], cache_dir: str, batch_size: int) -> Tensor:
    """[N, D] vectors, through the on-disk cache; encoded in length order to save padding."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    vectors = cached_encode(encoder, [texts[i] for i in order], Path(cache_dir) / "sgdd", batch_size)
    out = torch.empty_like(vectors)
    out[torch.tensor(order)] = vectors
    return out


class SGDDExamples:
    """Map-style dataset: target ids, attention mask and the source's vector per example."""

    def __init__(self, ids: Tensor, lengths: Tensor, vectors: Tensor) -> None:
        self.ids, self.lengths, self.vectors = ids, lengths, vectors  # [N, L], [N], [N, D]
        self.positions = torch.arange(ids.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": (self.positions < self.lengths[i]).long(),
            "cond": self.vectors[i],
            "prompt_lengths": torch.tensor(0),  # no prompt: every real token is scored (sft loss)
        }


def build_examples(
    pairs: list[tuple[str, str]], encoder: SemanticEncoder, tokenizer: HFTokenizer, cfg: RunConfig, batch: int
) -> SGDDExamples:
    ids, lengths = tokenize_targets(tokenizer, [t for _, t in pairs], cfg.model.block_size)
    vectors = encode_corpus(encoder, [s for s, _ in pairs], cfg.data.cache_dir, batch)
    return SGDDExamples(ids, lengths, vectors)


# ----------------------------------------------------------------------------- objective


class SGDDObjective:
    """Masked diffusion on the vector-conditioned decoder, plus CFG dropout, VIB KL and length CE."""

    def __init__(self, diffusion: MaskedDiffusionObjective, scfg: SGDDSystemConfig, model_cfg) -> None:
        self.diffusion = diffusion
        self.uncond_prob = scfg.uncond_prob
        self.length_weight = scfg.length_loss_weight
        self.kl_weight = model_cfg.encoder.vib_kl_weight if model_cfg.encoder.vib else 0.0
        self.noise_dim = model_cfg.semantic_dim if model_cfg.encoder.vib else 0

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        width = int(batch["attention_mask"].sum(1).max())  # columns past every row's end: all pad
        batch = {k: v[:, :width] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
        size = len(batch["input_ids"])
        batch["cond_drop"] = torch.rand(size, generator=generator) < self.uncond_prob  # [B]
        if self.noise_dim:
            batch["cond_noise"] = torch.randn(size, self.noise_dim, generator=generator)  # [B, K]
        return self.diffusion.prepare(batch, generator)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        diffusion_loss, metrics = self.diffusion.loss(model, batch)
        core = getattr(model, "module", model)  # DDP-wrapped or not
        kl, length_ce = core.aux_losses(
            batch["cond"], batch["attention_mask"].sum(1), batch.get("cond_noise")
        )
        total = diffusion_loss + self.kl_weight * kl + self.length_weight * length_ce
        return total, {
            **metrics,
            "diffusion_loss": diffusion_loss.item(),
            "length_ce": length_ce.item(),
            "kl": kl.item(),
        }


def build_objective(cfg: RunConfig, scfg: SGDDSystemConfig, tokenizer: HFTokenizer) -> SGDDObjective:
    inputs = ("cond", "cond_drop", "cond_noise") if cfg.model.encoder.vib else ("cond", "cond_drop")
    diffusion = MaskedDiffusionObjective(
        cfg.diffusion,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        num_steps=scfg.num_steps,
        model_inputs=inputs,
        packed_logits=True,
    )
    return SGDDObjective(diffusion, scfg, cfg.model)


# ----------------------------------------------------------------------------- build


def fill_from_encoder(cfg: RunConfig, encoder: SemanticEncoder, tokenizer: HFTokenizer) -> None:
    """Vocabulary, special ids and vector width from the encoder; with model.decoder=encoder the
    decoder's shape as well (it is started from the encoder's weights)."""
    shape = {}
    if cfg.model.decoder == "encoder":
        hf = encoder.model.config
        if getattr(hf, "model_type", "") != "bert":
            raise DifflmError(
                f"model.decoder=encoder needs a BERT-style encoder, got model_type={hf.model_type!r}: "
                "use model.decoder=scratch"
            )
        shape = {
            "n_layer": hf.num_hidden_layers,
            "n_head": hf.num_attention_heads,
            "n_embd": hf.hidden_size,
            "ffn_hidden": hf.intermediate_size,
        }
    cfg.model = dataclasses.replace(
        cfg.model,
        vocab_size=tokenizer.vocab_size,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        encoder_dim=encoder.dim,
        **shape,
    )


def init_from_checkpoint(model: SGDD, cfg: RunConfig, where: str) -> None:
    """Load a (phase-1) checkpoint's weights; its encoder must be the same."""
    path = ckpt.resolve_checkpoint(where)
    source = saved_config_from_dict(ckpt.read_json(path / ckpt.RUN_CONFIG_FILE))
    if model_family(source.model) != "sgdd" or source.model.encoder != cfg.model.encoder:
        raise DifflmError(
            f"system.init_from={where} is not an SGDD checkpoint with the same model.encoder settings"
        )
    ckpt.load_weights(model, path)


def build_sgdd(cfg: RunConfig) -> Run:
    if model_family(cfg.model) != "sgdd":
        raise DifflmError(f"task 'sgdd' trains model.family=sgdd, got {model_family(cfg.model)}")
    if cfg.diffusion.loss != "sft" or cfg.diffusion.noise != "mask":
        raise DifflmError(
            "task 'sgdd' needs diffusion.loss=sft (per-token normalisation) and diffusion.noise=mask"
        )
    scfg = system_config(cfg, SGDDSystemConfig)
    encoder = load_encoder(cfg.model.encoder)
    tokenizer = HFTokenizer(encoder.tokenizer)
    fill_from_encoder(cfg, encoder, tokenizer)
    examples = read_examples(cfg, scfg)
    train_idx, held_idx = split_holdout(len(examples), scfg.holdout, scfg.split_seed)
    train_pairs = [examples[i] for i in train_idx]
    if scfg.extra_data:
        held_texts = {text for i in held_idx for text in examples[i]}
        extra = read_file_examples(scfg.extra_data)
        train_pairs += [pair for pair in extra if not held_texts.intersection(pair)]
    if scfg.phase == "paraphrase" and scfg.both_directions:
        train_pairs += [(t, s) for s, t in train_pairs]
    batch = scfg.encode_batch_size
    train = build_examples(train_pairs, encoder, tokenizer, cfg, batch)
    val = build_examples([examples[i] for i in held_idx], encoder, tokenizer, cfg, batch)
    model = SGDD(cfg.model)
    if scfg.init_from:
        init_from_checkpoint(model, cfg, scfg.init_from)
    else:
        if cfg.model.decoder == "encoder":
            model.decoder.load_pretrained(encoder.model.state_dict())
        else:
            model.init_embeddings(encoder.token_embeddings(), cfg.model.embedding_init)
        if model.head.whitening is not None:
            model.head.whitening = Whitening.fit(train.vectors)
    return Run(model, build_objective(cfg, scfg, tokenizer), train, val, tokenizer)
