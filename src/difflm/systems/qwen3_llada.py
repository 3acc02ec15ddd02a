"""Qwen3-LLaDA systems: pretraining on packed text and SFT on conversations, plus their sampler,
and the causal Qwen3 they are converted from.

`qwen3_llada_pretrain`: text packed into `data.block_size` blocks with an HF tokenizer
(`text_blocks`), the masked-diffusion core (`MaskedDiffusionObjective`) with the loss and noise of the
`diffusion:` section. `qwen3_llada_sft`: conversation records (`difflm.data.conversations`),
one padded example per conversation; prompt and padding are never masked, attended to as keys
(padding) or scored, and the `sft` loss divides by each example's answer length.
`qwen3_ar_pretrain`: the same packed text for a causal Qwen3 (`model.family: qwen3`) trained by
next-token prediction, the AR starting point that `difflm convert --from qwen3` turns into Qwen3-LLaDA.

The model (`model.family: qwen3_llada`) is built from the architecture fields, or loaded from
`model.init_from` (a converted Qwen3 or a difflm step folder); then the spec stored with every
checkpoint describes the loaded architecture. `data.tokenizer` must be an HF tokenizer (with
`init_from`, usually the same folder).

`system.block_attention` trains with the same prompt + answer-block bias the sampler uses
(`difflm.models.block_attention`): pretraining rows are all answer (prompt length 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflm.config import RunConfig, model_family, opt, system_config
from difflm.data.blocks import text_blocks
from difflm.data.conversations import conversation_splits
from difflm.data.tokenizers import Tokenizer, build_tokenizer
from difflm.errors import DifflmError
from difflm.evaluate.options import EvalOptions
from difflm.models.block_attention import block_attention_bias
from difflm.models.layers import KVCache
from difflm.models.qwen3 import build_qwen3
from difflm.models.qwen3_llada import Qwen3LLaDASpec, build_qwen3_llada, load_qwen3_llada
from difflm.pretrained import Pretrained
from difflm.sampling.settings import SampleOptions, sample_config
from difflm.sampling.unmask import SampleResult, generate
from difflm.train.objectives import AutoregressiveObjective, MaskedDiffusionObjective
from difflm.train.trainer import Run, evaluate_loss

Batch = dict[str, Tensor]
FAMILY = "qwen3_llada"


@dataclass
class Qwen3LLaDASystem:
    """The `system:` section of the qwen3_llada systems."""

    block_attention: bool = opt(
        False, "Train with block attention: prompt sees prompt, an answer block sees prompt + its block."
    )
    block_length: int = opt(32, "Answer block length of block attention (sample with the same).")
    see_earlier_blocks: bool = opt(
        True, "Block attention: an answer block also sees every earlier block (block-causal)."
    )

    def __post_init__(self) -> None:
        if self.block_length < 1:
            raise DifflmError(f"system.block_length must be >= 1, got {self.block_length}")


# ----------------------------------------------------------------------------- building


def _check_family(cfg: RunConfig) -> None:
    if model_family(cfg.model) != FAMILY:
        raise DifflmError(f"task '{cfg.task}' trains model.family={FAMILY}, got {model_family(cfg.model)}")


def _hf_tokenizer(cfg: RunConfig) -> Tokenizer:
    if cfg.data.tokenizer == "char":
        raise DifflmError(
            f"task '{cfg.task}' needs an HF tokenizer: set data.tokenizer to a tokenizer folder (with model.init_from, that folder)"
        )
    return build_tokenizer(cfg.data.tokenizer)


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> nn.Module:
    """The denoiser, fresh or from `model.init_from`; fills `cfg.model` with what was built."""
    spec: Qwen3LLaDASpec = dataclasses.replace(
        cfg.model, vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_token_id
    )
    if spec.init_from:
        model, loaded = load_qwen3_llada(spec.init_from, spec)
        if tokenizer.vocab_size > loaded.vocab_size or loaded.mask_token_id != tokenizer.mask_token_id:
            raise DifflmError(
                f"tokenizer {cfg.data.tokenizer} (vocabulary {tokenizer.vocab_size}, mask id "
                f"{tokenizer.mask_token_id}) does not fit model.init_from (vocabulary {loaded.vocab_size}, "
                f"mask id {loaded.mask_token_id}); use the tokenizer saved with the checkpoint"
            )
        spec = loaded
    else:
        model = build_qwen3_llada(spec)
    if cfg.data.block_size > spec.max_position_embeddings:
        raise DifflmError(
            f"data.block_size {cfg.data.block_size} exceeds model.max_position_embeddings "
            f"{spec.max_position_embeddings}; lower one or raise the other"
        )
    cfg.model = spec
    return model


def block_bias_fn(system: Qwen3LLaDASystem) -> Callable[[Batch], Tensor]:
    """Batch -> block-attention bias [B, 1, L, L] (prompt lengths clamped to a truncated batch)."""

    def bias(batch: Batch) -> Tensor:
        ids = batch["input_ids"]  # [B, L]
        batch_size, length = ids.shape
        prompts = batch.get("prompt_lengths", torch.zeros(batch_size, dtype=torch.long))  # [B]
        return block_attention_bias(
            prompts.clamp(max=length),
            length,
            system.block_length,
            see_earlier_blocks=system.see_earlier_blocks,
            attention_mask=batch.get("attention_mask"),
            check_fit=False,
        )

    return bias


def build_objective(cfg: RunConfig, tokenizer: Tokenizer) -> MaskedDiffusionObjective:
    """The core objective with `diffusion.loss`; no special id is protected (the answer's EOS is learned)."""
    system = system_config(cfg, Qwen3LLaDASystem)
    return MaskedDiffusionObjective(
        cfg.diffusion,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        attention_bias_fn=block_bias_fn(system) if system.block_attention else None,
    )


def build_pretrain(cfg: RunConfig) -> Run:
    _check_family(cfg)
    if cfg.diffusion.loss == "sft":
        raise DifflmError(
            "diffusion.loss=sft needs prompts; pretraining has none: use elbo, dllm or soft_ce"
        )
    tokenizer = _hf_tokenizer(cfg)
    tokenizer, train, val = text_blocks(cfg.data, tokenizer)
    model = build_model(cfg, tokenizer)
    return Run(model, build_objective(cfg, tokenizer), train, val, tokenizer)


def build_ar_pretrain(cfg: RunConfig) -> Run:
    """A causal Qwen3 (`model.family: qwen3`) trained by next-token prediction on packed text: the AR
    model that `difflm convert --from qwen3` turns into a Qwen3-LLaDA."""
    if model_family(cfg.model) != "qwen3":
        raise DifflmError(f"task '{cfg.task}' trains model.family=qwen3, got {model_family(cfg.model)}")
    tokenizer, train, val = text_blocks(cfg.data, _hf_tokenizer(cfg))
    if cfg.data.block_size > cfg.model.max_position_embeddings:
        raise DifflmError(
            f"data.block_size {cfg.data.block_size} exceeds model.max_position_embeddings "
            f"{cfg.model.max_position_embeddings}; lower one or raise the other"
        )
    cfg.model = dataclasses.replace(
        cfg.model, vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_token_id
    )
    return Run(build_qwen3(cfg.model), AutoregressiveObjective(), train, val, tokenizer)


def sft_splits(cfg: RunConfig, tokenizer: Tokenizer) -> tuple[object, object]:
    """(train, val): one padded example per conversation record."""
    return conversation_splits(
        cfg.data.path,
        tokenizer,
        cfg.data.block_size,
        cfg.data.val_fraction,
        field=cfg.data.field or "conversations",
    )


def build_sft(cfg: RunConfig) -> Run:
    _check_family(cfg)
    tokenizer = _hf_tokenizer(cfg)
    train, val = sft_splits(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    return Run(model, build_objective(cfg, tokenizer), train, val, tokenizer)


def eval_sft(pre: Pretrained, opts: EvalOptions) -> dict:
    """`difflm eval CKPT` for qwen3_llada_sft: the training loss (`diffusion.loss`, answers only,
    under the training bias) on the held-out conversations, with a fixed noise seed. The packed-text
    ELBO of `qwen3_llada_pretrain` does not apply: SFT data are conversation records, not text."""
    val = sft_splits(pre.config, pre.tokenizer)[1]
    tc = dataclasses.replace(pre.config.train, batch_size=opts.batch_size, precision="fp32", seed=opts.seed)
    objective = build_objective(pre.config, pre.tokenizer)
    batches = opts.max_batches or max(1, len(val) // opts.batch_size)
    return {"val_loss": evaluate_loss(pre.model, objective, val, tc, batches=batches)}


# ----------------------------------------------------------------------------- sampling


class WithAttentionBias(nn.Module):
    """A denoiser that adds a fixed bias [1, 1, L, L] to the one the sampler passes (padding).

    It passes the KV-cache and `logits_at` keywords through, slicing the fixed bias to the queries
    and keys of a cached step. Under block attention the caches are exact: a block never sees a
    later one, so neither the cached prefix nor the cached suffix depends on the block in flight.
    """

    def __init__(self, model: nn.Module, bias: Tensor) -> None:
        super().__init__()
        self.model = model
        self.bias = bias
        self.mask_token_id = model.mask_token_id
        self.config = model.config
        self.max_length, self.logits_shift = model.max_length, model.logits_shift
        self.supports_kv_cache, self.supports_logits_at = model.supports_kv_cache, model.supports_logits_at

    def forward(
        self,
        input_ids: Tensor,
        attention_bias: Tensor | None = None,
        position_offset: int = 0,
        kv_cache: KVCache | None = None,
        attend_len: int | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        queries = input_ids.shape[1]
        keys = queries if kv_cache is None else attend_len or position_offset + queries
        fixed = self.bias[:, :, position_offset : position_offset + queries, :keys]  # [1, 1, Q, K]
        bias = fixed if attention_bias is None else attention_bias + fixed
        extra = {"logits_at": logits_at} if logits_at is not None else {}
        if kv_cache is not None:
            extra.update(position_offset=position_offset, kv_cache=kv_cache, attend_len=attend_len)
        return self.model(input_ids, attention_bias=bias, **extra)

    def kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return self.model.kv_cache(batch, max_len, dtype)


def sample(
    pre: Pretrained, opts: SampleOptions, ids: Tensor, mask: Tensor, generator: torch.Generator
) -> SampleResult:
    """`difflm sample` on a Qwen3-LLaDA checkpoint. `--block-attention` samples under the block bias
    of training; an SFT checkpoint may generate EOS and fills everything after its first EOS."""
    cfg = sample_config(opts, pre.tokenizer, pre.config.diffusion.block_length)
    eos = pre.tokenizer.eos_token_id
    if pre.config.task == "qwen3_llada_sft" and eos is not None:
        allowed = [i for i in cfg.suppress_tokens if i != eos]
        cfg = dataclasses.replace(cfg, suppress_tokens=allowed, eos_token_id=eos, eos_mode="fill")
    align = (-ids.shape[1]) % cfg.block_length if cfg.block_causal else 0  # BD3: prompt padded to blocks
    prompt_length, length = ids.shape[1], align + ids.shape[1] + cfg.gen_length
    limit = pre.model.max_length
    if length > limit:
        raise DifflmError(
            f"prompt of {prompt_length} tokens + gen length {cfg.gen_length} exceeds the model's {limit} positions"
        )
    model = pre.model
    if opts.block_attention:
        if cfg.block_length is None:
            raise DifflmError("--block-attention needs --block-length (the training system.block_length)")
        system = system_config(pre.config, Qwen3LLaDASystem)
        bias = block_attention_bias(
            torch.tensor([prompt_length]),
            length,
            cfg.block_length,
            see_earlier_blocks=system.see_earlier_blocks,
        ).to(ids.device)  # [1, 1, L, L]: after left padding every row's prompt is [0, P)
        model = WithAttentionBias(model, bias)
    trace = opts.trace
    return generate(model, ids, cfg, attention_mask=mask, generator=generator, trace=trace)
