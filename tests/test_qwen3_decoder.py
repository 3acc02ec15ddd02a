"""difflm's own Qwen3 forward: parity with `Qwen3ForCausalLM`, exact cached steps, config spellings,
and registration with the Auto classes on `import difflm` (transformers is only the reference here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, Qwen3Config, Qwen3ForCausalLM

import difflm
from difflm import auto
from difflm.errors import DifflmError
from difflm.models.layers import causal_bias
from difflm.models.qwen3_llada import Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM, as_denoiser

VOCAB = 48
SHAPES = {  # GQA with head_dim * heads == hidden, and with head_dim * heads != hidden (Qwen3-style)
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gqa_wide_heads": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
}


def reference(shape: str, tied: bool, attn: str) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=tied,
        attn_implementation=attn, **SHAPES[shape],
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a missing or misplaced norm shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def ours_from(source: Qwen3ForCausalLM, attn: str) -> Qwen3LLaDAForMaskedLM:
    fields = {k: v for k, v in source.config.to_dict().items() if k not in ("model_type", "architectures")}
    model = Qwen3LLaDAForMaskedLM(Qwen3LLaDAConfig(**fields, attn_implementation=attn)).eval()
    model.load_state_dict(source.state_dict())  # strict: every HF key, nothing else
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_causal_bias_gives_qwen3_logits(shape, tied, attn):
    """Right- and left-padded rows: every real position's logits equal Qwen3ForCausalLM's to 1e-5."""
    source = reference(shape, tied, attn)
    model = ours_from(source, attn)
    assert model.config.rope_theta == 500000.0 and model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[1, 9:] = 0  # right padding
    padding[2, :4] = 0  # left padding
    with torch.no_grad():
        expected = source(ids, attention_mask=padding).logits  # [B, L, V]
        got = model(ids, attention_bias=causal_bias(12), attention_mask=padding).logits
    real = padding.bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_steps_equal_the_full_forward():
    """Prefix (feed [lo, L)), dual (feed [lo, hi), attend over all L) and causal decoding one token
    at a time all reproduce the full forward on an unchanged sequence."""
    model = ours_from(reference("gqa", tied=False, attn="sdpa"), "sdpa")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits  # [B, L, V]
    cache = model.kv_cache(2, max_len=10)
    assert cache.k[0].shape == (2, 2, 10, 8)  # key/value heads only
    torch.testing.assert_close(model(ids, kv_cache=cache, attend_len=10).logits, full, atol=1e-5, rtol=0)
    prefix = model(ids[:, 6:], position_offset=6, kv_cache=cache, attend_len=10).logits
    torch.testing.assert_close(prefix, full[:, 6:], atol=1e-5, rtol=0)
    dual = model(ids[:, 4:7], position_offset=4, kv_cache=cache, attend_len=10).logits
    torch.testing.assert_close(dual, full[:, 4:7], atol=1e-5, rtol=0)

    causal = model(ids, attention_bias=causal_bias(10)).logits
    cache = model.kv_cache(2, max_len=10)
    steps = [model(ids[:, i : i + 1], position_offset=i, kv_cache=cache).logits for i in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), causal, atol=1e-5, rtol=0)


@torch.no_grad()
def test_denoiser_packs_logits_and_keeps_hf_keys():
    model = ours_from(reference("gqa", tied=True, attn="sdpa"), "sdpa")
    model.config.mask_token_id = VOCAB - 1
    denoiser = as_denoiser(model)
    assert denoiser.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    at = torch.zeros(2, 6, dtype=torch.bool)
    at[0, 1], at[1, 4] = True, True
    full = denoiser(ids)  # [B, L, V]
    torch.testing.assert_close(denoiser(ids, logits_at=at), full[at], atol=1e-6, rtol=0)  # [2, V]
    assert denoiser.mask_token_id == VOCAB - 1


def test_config_reads_both_rope_spellings_and_refuses_scaled_rope():
    shape = dict(vocab_size=8, hidden_size=8, num_attention_heads=2, head_dim=4, num_hidden_layers=1)
    legacy = Qwen3LLaDAConfig(**shape, rope_theta=1e6, rope_scaling=None)  # transformers 4 config.json
    current = Qwen3LLaDAConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert legacy.rope_theta == current.rope_theta == 1e6
    assert Qwen3LLaDAConfig(**shape).rope_theta == 10000.0  # Qwen3Config's default
    assert legacy.num_key_value_heads == 2 and legacy.head_dim == 4
    with pytest.raises(DifflmError, match="RoPE type 'yarn' is not supported"):
        Qwen3LLaDAConfig(**shape, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(DifflmError, match="hidden_act 'silu'"):
        Qwen3LLaDAConfig(**shape, hidden_act="gelu")


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_reload_through_the_auto_class(tmp_path, tied):
    model = ours_from(reference("gqa", tied=tied, attn="sdpa"), "sdpa")
    model.config.mask_token_id = 3
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen3_llada" and saved["rope_theta"] == 500000.0
    assert "rope_parameters" not in saved and "layer_types" not in saved
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, Qwen3LLaDAForMaskedLM) and reloaded.mask_token_id == 3
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_src_never_imports_transformers_private_qwen3():
    src = Path(difflm.__file__).parent
    offenders = [p for p in src.rglob("*.py") if "transformers.models.qwen3" in p.read_text()]
    assert offenders == []


def test_install_is_idempotent():
    auto.install()
    auto.install()
    assert sum(isinstance(finder, auto._AutoHook) for finder in sys.meta_path) == 1


SCRIPT = """
import sys
import difflm
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
config = AutoConfig.from_pretrained(sys.argv[1])
masked = AutoModelForMaskedLM.from_pretrained(sys.argv[1])
bare = AutoModel.from_pretrained(sys.argv[1])
print(heavy, type(config).__name__, type(masked).__name__, type(bare).__name__, masked.mask_token_id)
"""


def test_import_difflm_registers_the_auto_classes_lazily(tmp_path):
    """In a fresh interpreter: `import difflm` loads neither torch nor transformers, and afterwards
    the Auto classes load a Qwen3-LLaDA folder."""
    model = ours_from(reference("gqa", tied=True, attn="sdpa"), "sdpa")
    model.config.mask_token_id = 5
    model.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(difflm.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "Qwen3LLaDAConfig", "Qwen3LLaDAForMaskedLM", "Qwen3LLaDAModel", "5"]
