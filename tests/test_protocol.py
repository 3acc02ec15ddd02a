"""The denoiser protocol (models/protocol.py): every registered family declares it, and a model
that does not is refused with a message naming what it lacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflm.errors import DifflmError
from difflm.models import MODEL_CONFIGS, build_model
from difflm.models.dfgpt import DFGPTConfig
from difflm.models.mlm import MLMConfig
from difflm.models.protocol import Denoiser, SequenceModel, check_denoiser, max_length_of
from difflm.models.qwen3 import Qwen3Spec
from difflm.models.qwen3_llada import Qwen3LLaDASpec
from difflm.models.sgdd import SGDDConfig
from difflm.models.transformer import TransformerConfig
from difflm.sampling.settings import SampleConfig
from difflm.sampling.unmask import generate

QWEN3 = {  # the architecture fields shared by the bidirectional and the causal Qwen3
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 20,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 32,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 24,
}

# family -> (tiny config, its max_length); a family added to the registry must be added here
TINY = {
    "transformer": (
        TransformerConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, mask_token_id=31),
        16,
    ),
    "sgdd": (
        SGDDConfig(
            vocab_size=32,
            block_size=12,
            n_layer=1,
            n_head=2,
            n_embd=16,
            ffn_hidden=32,
            pad_token_id=0,
            mask_token_id=31,
            embedding_init="random",
        ),
        12,
    ),
    "qwen3_llada": (Qwen3LLaDASpec(**QWEN3, mask_token_id=31), 20),
    "qwen3": (Qwen3Spec(**QWEN3), 20),
    "mlm": (MLMConfig(mask_token_id=4, hf_config=BERT), 24),
    "dfgpt": (DFGPTConfig(vocab_size=32, block_size=10, n_layer=1, n_head=2, n_embd=16), 10),
}
# SequenceModels that are not masked Denoisers: Diffusion Forcing (continuous noise) and the causal
# Qwen3 that a Qwen3-LLaDA is converted from
NOT_DENOISERS = {"dfgpt", "qwen3"}


def test_every_family_is_listed_here():
    assert set(TINY) == set(MODEL_CONFIGS)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_declares_the_protocol(family):
    cfg, length = TINY[family]
    model = build_model(family, cfg)
    assert isinstance(model, SequenceModel) and max_length_of(model) == length
    if family in NOT_DENOISERS:
        assert not isinstance(model, Denoiser)
        return
    assert isinstance(model, Denoiser) and check_denoiser(model) is model
    logits = model(torch.randint(0, 30, (2, 6)))
    assert logits.shape[:2] == (2, 6)


class Undeclared(nn.Module):
    """A denoiser by behaviour only: it returns logits and has a mask token, nothing declared."""

    mask_token_id = 7

    def forward(self, input_ids, **_):
        return torch.zeros(*input_ids.shape, 8)


def test_a_model_without_the_protocol_is_refused():
    with pytest.raises(
        DifflmError, match="lacks max_length, supports_kv_cache, supports_logits_at, logits_shift"
    ):
        generate(Undeclared(), torch.tensor([[1, 2]]), SampleConfig(gen_length=4, steps=4))
    with pytest.raises(DifflmError, match="declares no max_length"):
        max_length_of(Undeclared())
