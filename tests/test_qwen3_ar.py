"""The causal Qwen3 a Qwen3-LLaDA is converted from: trained by the one trainer (`qwen3_ar_pretrain`),
saved as a Hugging Face Qwen3 folder, converted, and the diffusion run starts from its exact weights."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3ForCausalLM

from difflm.config import load_config
from difflm.convert import convert_qwen3
from difflm.errors import DifflmError
from difflm.models.layers import causal_bias
from difflm.models.qwen3_llada import Qwen3LLaDAForMaskedLM
from difflm.pretrained import load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.systems.registry import build_run
from difflm.train.trainer import train
from tests.qwen3_llada_fixtures import pretrain_overrides

AR = ("task=qwen3_ar_pretrain", "model.family=qwen3")


def test_ar_qwen3_trains_converts_and_seeds_diffusion(tmp_path):
    cfg = load_config(None, pretrain_overrides(tmp_path, "ar", *AR, "train.max_steps=6"))
    state = train(cfg, build_run(cfg))
    assert state.step == 6 and state.val_loss < math.log(45)  # it learned: below uniform over the 45 tokens
    step = tmp_path / "ar/checkpoints/step-6"
    ar = Qwen3ForCausalLM.from_pretrained(step).eval()  # the step folder is a Hugging Face Qwen3 folder
    ids = torch.tensor([[9, 4, 11, 4, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(step).model(ids).logits, ar(ids).logits, rtol=0, atol=0)

    report = convert_qwen3(str(step), str(tmp_path / "converted"), mask_token="<mask>")
    assert not report.token_added and report.vocab_after == report.vocab_before  # the mask was there
    llada = Qwen3LLaDAForMaskedLM.from_pretrained(tmp_path / "converted", attn_implementation="eager").eval()
    with torch.no_grad():  # under a causal bias the converted model is the AR model
        torch.testing.assert_close(
            llada(ids, attention_bias=causal_bias(ids.shape[1])).logits, ar(ids).logits, rtol=1e-5, atol=1e-5
        )

    init = f"model.init_from={tmp_path / 'converted'}"
    diffusion = build_run(load_config(None, pretrain_overrides(tmp_path, "diffusion", init)))
    for key, value in llada.state_dict().items():
        assert torch.equal(diffusion.model.state_dict()[key], value), key  # diffusion starts from the AR model


def test_ar_qwen3_samples_with_its_cache_and_refuses_init_from(tmp_path):
    cfg = load_config(None, pretrain_overrides(tmp_path, "ar", *AR, "train.max_steps=3"))
    train(cfg, build_run(cfg))
    model = load_pretrained(tmp_path / "ar").model
    prompt = torch.tensor([[9, 4, 11]])
    cached = generate_ar(model, prompt, max_new_tokens=5).tokens
    uncached = generate_ar(model, prompt, max_new_tokens=5, use_cache=False).tokens
    assert torch.equal(cached, uncached) and cached.shape == (1, 8)
    with pytest.raises(DifflmError, match="init_from is not supported by model.family=qwen3"):
        load_config(None, pretrain_overrides(tmp_path, "x", *AR, f"model.init_from={tmp_path}"))
