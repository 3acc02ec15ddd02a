"""LoRA SFT of a tiny Qwen3-LLaDA through peft: only adapters train, adapters saved alone, merged
for sampling and serving."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from difflm.config import load_config  # noqa: E402
from difflm.errors import DifflmError  # noqa: E402
from difflm.pretrained import load_pretrained  # noqa: E402
from difflm.serve.models import load_served  # noqa: E402
from difflm.systems.registry import build_run  # noqa: E402
from difflm.train import lora  # noqa: E402
from difflm.train.trainer import train  # noqa: E402
from tests.qwen3_llada_fixtures import sft_overrides  # noqa: E402

IDS = torch.tensor([[9, 4, 11, 4, 12, 13]])


def test_lora_sft_trains_adapters_only_and_merges_for_serving(tmp_path) -> None:
    cfg = load_config(
        None, sft_overrides(tmp_path, "sft", "train.max_steps=3", "train.lora.r=4", "train.lr=1e-2")
    )
    run = build_run(cfg)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    train(cfg, run)
    step = tmp_path / "sft/checkpoints/step-3"
    saved = load_file(str(step / "model.safetensors"))
    for (
        key,
        value,
    ) in before.items():  # every base weight is untouched (q_proj.weight -> q_proj.base_layer.weight)
        stored = saved.get(key, saved.get(key.replace(".weight", ".base_layer.weight")))
        tied = saved["model.embed_tokens.weight"]  # a tied head is stored once, as the embedding
        assert torch.equal(value, stored if stored is not None else tied), key
    adapters = load_file(str(step / lora.ADAPTER_FILE))
    assert len(adapters) == 2 * 4 * 2  # lora_A and lora_B of q, k, v, o in 2 layers
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # B left 0
    config = json.loads((step / lora.ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        expected = run.model.eval()(IDS)  # the adapted model, unmerged
        merged = load_pretrained(step).model
        assert set(merged.state_dict()) == set(before)  # the family's own names: a plain model
        torch.testing.assert_close(merged(IDS), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(merged(IDS), _base_logits(cfg, before), atol=1e-4)  # the adapters count
    served = load_served(step)  # `difflm serve` on the LoRA run: the merged model
    assert not served.autoregressive and not lora.has_adapters(served.pre.model)


def test_lora_adapter_files_hold_the_ema_adapters(tmp_path) -> None:
    extra = ("train.max_steps=2", "train.lora.r=4", "train.lr=1e-2", "train.ema=0.5")
    cfg = load_config(None, sft_overrides(tmp_path, "sft", *extra))
    train(cfg, build_run(cfg))
    step = tmp_path / "sft/checkpoints/step-2"
    adapters = load_file(str(step / lora.ADAPTER_FILE))
    ema, raw = (load_file(str(step / name)) for name in ("ema.safetensors", "model.safetensors"))
    named = {k.replace(".default.", "."): k for k in ema if ".lora_" in k}  # peft drops the adapter name
    assert set(adapters) == set(named)
    assert all(torch.equal(adapters[k], ema[named[k]]) for k in adapters)
    assert not all(torch.equal(adapters[k], raw[named[k]]) for k in adapters)


def _base_logits(cfg, weights: dict) -> torch.Tensor:
    from difflm.config import model_family
    from difflm.models import build_model

    base = build_model(model_family(cfg.model), cfg.model).eval()
    base.load_state_dict(weights)
    return base(IDS)


def test_lora_config_is_checked(tmp_path) -> None:
    with pytest.raises(DifflmError, match="train.lora needs r >= 0"):
        load_config(None, sft_overrides(tmp_path, "x", "train.lora.r=-1"))
    with pytest.raises(DifflmError, match="strategy=fsdp is not supported"):
        load_config(None, sft_overrides(tmp_path, "x", "train.lora.r=4", "train.strategy=fsdp"))
    cfg = load_config(
        None, sft_overrides(tmp_path, "x", "train.lora.r=4", "train.lora.target_modules=[nope]")
    )
    with pytest.raises(DifflmError, match="matched no layer"):
        lora.add_adapters(build_run(cfg).model, cfg.train.lora, "qwen3_llada")
