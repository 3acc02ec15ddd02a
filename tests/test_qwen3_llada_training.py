"""Qwen3-LLaDA through the one trainer: pretrain -> SFT, HF-loadable checkpoints, exact resume, CLI."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, Qwen3Config, Qwen3ForCausalLM

from difflm.commands import sample as sample_command
from difflm.config import load_config
from difflm.pretrained import load_pretrained
from difflm.systems.registry import build_run
from difflm.train.optim import build_optimizer
from difflm.train.trainer import train
from tests.qwen3_llada_fixtures import pretrain_overrides, sft_overrides


def trained(overrides: list[str]):
    cfg = load_config(None, overrides)
    run = build_run(cfg)
    state = train(cfg, run)
    return cfg, run, state


def log_records(run_dir, key: str) -> list[tuple[int, float]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def check_checkpoint_round_trip(step, model) -> None:
    """load_pretrained and AutoModelForMaskedLM both rebuild `model` exactly from a step folder."""
    ids = torch.tensor([[9, 4, 11, 4, 12, 13]])
    with torch.no_grad():
        expected = model.eval()(ids)  # [1, L, V]
        torch.testing.assert_close(load_pretrained(step).model(ids), expected, rtol=0, atol=0)
        hf = AutoModelForMaskedLM.from_pretrained(step, attn_implementation="eager").eval()  # an HF folder
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=0)
    causal_keys = set(Qwen3ForCausalLM(Qwen3Config(**model.config.to_dict())).state_dict())
    assert set(load_file(str(step / "model.safetensors"))) <= causal_keys  # Qwen3's own key names


@pytest.mark.slow
def test_pretrain_then_sft_then_chat_sample(tmp_path, capsys):
    _, run, state = trained(pretrain_overrides(tmp_path, "pre", "train.max_steps=3"))
    assert state.step == 3 and state.val_loss is not None
    step = tmp_path / "pre/checkpoints/step-3"
    pre = load_pretrained(step)

    sft = sft_overrides(
        tmp_path, "sft", "train.max_steps=3", f"model.init_from={step}", f"data.tokenizer={step}"
    )
    cfg = load_config(None, sft)
    run = build_run(cfg)
    for key, value in pre.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[key], value), key  # SFT starts from pretraining
    assert cfg.model.hidden_size == 32 and cfg.model.mask_token_id == pre.tokenizer.mask_token_id
    state = train(cfg, run)
    assert state.step == 3 and torch.isfinite(torch.tensor(state.val_loss))

    parser = argparse.ArgumentParser()
    sample_command.add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "sft"), "--prompt", "w1 w7", "--chat", "--gen-length", "4", "--json"]
    )
    assert sample_command.run(args) == 0
    out, run = map(json.loads, capsys.readouterr().out.strip().splitlines()[-2:])  # the sample, then the run
    assert out["prompt"] == "w1 w7" and "<mask>" not in out["completion"]
    assert run["run"]["tokens"] == 4 and run["run"]["forward_passes"] >= 1


def test_resume_is_exact_and_checkpoints_round_trip(tmp_path):
    extra = [
        "train.max_steps=6",
        "system.block_attention=true",
        "system.block_length=4",
        "train.warmup_steps=2",
    ]
    _, full, _ = trained(pretrain_overrides(tmp_path, "full", *extra))
    trained(pretrain_overrides(tmp_path, "part", *extra, "train.stop_at_step=3"))
    trained(pretrain_overrides(tmp_path, "part", *extra, "train.resume=latest"))
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "full/checkpoints/step-6" / name))
        b = load_file(str(tmp_path / "part/checkpoints/step-6" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for key in ("loss", "lr"):
        assert log_records(tmp_path / "full", key) == log_records(tmp_path / "part", key)
    check_checkpoint_round_trip(tmp_path / "full/checkpoints/step-6", full.model)
    lrs = [lr for _, lr in log_records(tmp_path / "full", "lr")]
    assert lrs[:2] == [0.0015, 0.003] and lrs[-1] > 3e-4  # warmup, then cosine toward min_lr


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizers_fall_back_to_adamw(tmp_path, name):
    cfg = load_config(None, pretrain_overrides(tmp_path, "out", f"train.optimizer={name}"))
    run = build_run(cfg)
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build_optimizer(run.model, cfg.train)
    assert type(optimizer) is torch.optim.AdamW
    assert any("falling back to torch AdamW" in str(w.message) for w in caught)
