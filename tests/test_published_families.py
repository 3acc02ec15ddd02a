"""LLaDA and Dream run natively: published key layouts, forwards against independent references
(hand-written LLaDA, HF Qwen2 for Dream + its logits shift), exact caches, snapshot loading, `difflm sample`,
`difflm inspect DIR`'s key mapping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from difflm.cli import main
from difflm.errors import DifflmError
from difflm.hf_configs import DreamConfig, LLaDAConfig
from difflm.models.decoder import as_denoiser
from difflm.models.dream import DreamForMaskedLM
from difflm.models.layers import causal_bias, padding_bias
from difflm.models.llada import LLaDAModelLM
from difflm.pretrained import load_pretrained
from difflm.sampling.cache import BlockForward
from difflm.sampling.unmask import SampleConfig, generate
from difflm.snapshots import check_snapshot, load_model

V, MASK, L = 64, 60, 16
WORDS = ["<unk>", "<eos>", "<pad>", *(f"w{i}" for i in range(MASK - 3)), "<|mask|>", "x0", "x1", "x2"]


def tiny_llada(tied: bool = False) -> LLaDAModelLM:
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=V,
                         embedding_size=V, max_sequence_length=64, rope_theta=500000.0, weight_tying=tied,
                         mask_token_id=MASK, eos_token_id=1, pad_token_id=2)  # fmt: skip
    model = LLaDAModelLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                param.uniform_(0.5, 1.5)  # so that a misplaced norm shows
            else:
                param.mul_(20)  # confident predictions, so threshold decoding takes several per step
    return model


def tiny_dream() -> DreamForMaskedLM:
    torch.manual_seed(0)
    config = DreamConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=1e6, mask_token_id=MASK, pad_token_id=2, eos_token_id=1)  # fmt: skip
    model = DreamForMaskedLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(0.5, 1.5) if "norm" in name else param.mul_(20)
    return model


FAMILIES = {"llada": tiny_llada, "dream": tiny_dream}


def published_folder(root: Path, family: str) -> Path:
    """A folder laid out like the published snapshot: sharded safetensors + index, the published
    architectures / auto_map (never used), a tokenizer without a declared mask token, a chat template."""
    folder = root / family
    FAMILIES[family]().save_pretrained(folder, max_shard_size="40KB")
    config = json.loads((folder / "config.json").read_text())
    published = {"llada": ("LLaDAModelLM", "modeling_llada"), "dream": ("DreamModel", "modeling_dream")}
    name, module = published[family]
    config.update(architectures=[name], auto_map={"AutoModel": f"{module}.{name}"})
    (folder / "config.json").write_text(json.dumps(config))
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    template = "{% for m in messages %}w0 {{ m['content'] }} {% endfor %}w1"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- layouts and configs


def test_llada_keys_are_the_published_layout():
    block = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    expected = {f"model.transformer.blocks.{n}.{p}.weight" for n in range(2) for p in block}
    expected |= {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    assert set(tiny_llada(tied=True).state_dict()) == expected  # weight_tying: the head is wte
    assert set(tiny_llada().state_dict()) == expected | {"model.transformer.ff_out.weight"}


def test_configs_carry_the_published_defaults_and_refuse_what_is_not_implemented():
    llada, dream = LLaDAConfig(), DreamConfig()
    assert (llada.mask_token_id, llada.rope_theta, llada.rms_norm_eps, llada.head_dim) == (
        126336,
        500000.0,
        1e-5,
        128,
    )
    assert (dream.mask_token_id, dream.pad_token_id, dream.head_dim) == (151666, 151643, 128)
    with pytest.raises(DifflmError, match="block_type='sequential' is not supported"):
        LLaDAConfig(block_type="sequential")
    with pytest.raises(DifflmError, match="RoPE type 'yarn'"):
        DreamConfig(rope_scaling={"type": "yarn", "factor": 4.0})


# ----------------------------------------------------------------------------- forwards vs references


def llada_reference(model: LLaDAModelLM, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written out from its published modeling file: complex-number RoPE over the
    pairs (j, j + D/2), explicit softmax attention, LLaDA's own GQA repeat_interleave."""
    c, sd = model.config, model.state_dict()
    B, T = ids.shape
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.d_model // c.n_heads
    angles = torch.arange(T).float()[:, None] * (1.0 / c.rope_theta ** (torch.arange(0, D, 2).float() / D))
    turn = torch.polar(torch.ones_like(angles), angles)  # [T, D/2]

    def rope(t):
        z = torch.complex(t[..., : D // 2], t[..., D // 2 :]) * turn
        return torch.cat([z.real, z.imag], dim=-1)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    x = sd["model.transformer.wte.weight"][ids]
    for n in range(c.n_layers):
        w = {k.split(".")[-2]: v for k, v in sd.items() if k.startswith(f"model.transformer.blocks.{n}.")}
        h = rms(x, w["attn_norm"])
        q = (h @ w["q_proj"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ w["k_proj"].T).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        v = (h @ w["v_proj"].T).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / D**0.5, dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, -1) @ w["attn_out"].T
        h = rms(x, w["ff_norm"])
        x = x + (F.silu(h @ w["ff_proj"].T) * (h @ w["up_proj"].T)) @ w["ff_out"].T
    return rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T


@torch.no_grad()
def test_llada_matches_the_reference_and_keeps_rope_positions_under_a_prefix_cache():
    model = tiny_llada()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = llada_reference(model, ids)  # [B, T, V]
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-5)
    cache = model.kv_cache(2, max_len=12)
    model(ids, kv_cache=cache, attend_len=12)
    cached = model(ids[:, 7:], position_offset=7, kv_cache=cache, attend_len=12).logits  # positions 7..11
    torch.testing.assert_close(cached, expected[:, 7:], atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_dream_is_qwen2_with_shifted_logits():
    """Under a causal bias Dream's raw outputs are Qwen2ForCausalLM's; `.logits` are them shifted by one."""
    model = tiny_dream()
    c = model.config
    torch.manual_seed(1)
    source = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, rope_theta=c.rope_theta,
                                          max_position_embeddings=64, tie_word_embeddings=False)).eval()  # fmt: skip
    source.load_state_dict(model.state_dict())  # strict: Dream's keys are Qwen2's
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    raw = source(ids).logits  # [B, T, V]
    got = model(ids, attention_bias=causal_bias(10)).logits
    torch.testing.assert_close(got, torch.cat([raw[:, :1], raw[:, :-1]], dim=1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_cached_block_steps_equal_the_full_forward(family, mode):
    """On an unchanged, left-padded sequence the refresh and the cached step both reproduce the full
    forward's block columns (Dream: the cached step reads position 11 to predict position 12)."""
    model = as_denoiser(FAMILIES[family]())
    x = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(3))
    x[:, 12:] = MASK
    bias = padding_bias(torch.tensor([[0] * 3 + [1] * (L - 3), [1] * L]))
    full = model(x, attention_bias=bias)  # [B, L, V]
    forward = BlockForward(model, mode, L)
    first, cached = forward(x, bias, {}, 12, 16), forward(x, bias, {}, 12, 16)
    torch.testing.assert_close(first, full[:, 12:16], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cached, full[:, 12:16], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_batches_rows_with_cache_threshold_and_guidance(family):
    model = as_denoiser(FAMILIES[family]())
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    config = SampleConfig(
        gen_length=8, steps=8, block_length=4, cache="dual", threshold=0.5, suppress_tokens=[0, 1, 2]
    )
    batch = generate(model, ids, config, attention_mask=mask)
    solo = generate(model, ids[:1, 2:], config)
    assert torch.equal(batch.tokens[0, -8:], solo.tokens[0, -8:])  # a padded row decodes as alone
    assert torch.equal(batch.tokens[:, :5], ids) and not (batch.tokens == MASK).any()
    guided = generate(model, ids, SampleConfig(**{**vars(config), "cfg_scale": 1.0}), attention_mask=mask)
    assert not (guided.tokens == MASK).any() and torch.equal(guided.tokens[:, :5], ids)


# ----------------------------------------------------------------------------- snapshots and the CLI


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_snapshot_loads_through_difflm_alone_in_fp32_and_bf16(tmp_path, family):
    folder = published_folder(tmp_path, family)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    pre = load_pretrained(folder)
    assert pre.tokenizer.mask_token_id == MASK == pre.model.mask_token_id  # pinned by id, not added
    ids = torch.randint(0, MASK, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(pre.model(ids), as_denoiser(FAMILIES[family]())(ids))
        half = load_model(folder, dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        full = pre.model(ids)  # [1, T, V]
        assert (half(ids).logits.float() - full).abs().mean() < 0.05 * full.abs().mean()  # bf16 rounding only


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sample_command_runs_a_published_folder_with_its_chat_template(tmp_path, family, capsys):
    folder = published_folder(tmp_path, family)
    argv = ["sample", str(folder), "--prompt", "w3 w4", "--chat", "--gen-length", "8", "--block-length", "4",
            "--cache", "dual", "--threshold", "0.9", "--json"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])  # the last line holds the run stats
    words = record["completion"].split()
    assert record["prompt"] == "w3 w4" and 0 < len(words) <= 8 and "<|mask|>" not in words


def test_incomplete_or_foreign_snapshots_are_refused_in_one_line(tmp_path):
    folder = published_folder(tmp_path, "llada")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "aside")
    with pytest.raises(DifflmError, match=r"incomplete: 1 of \d+ weight shards missing"):
        check_snapshot(folder)
    (tmp_path / "aside").rename(shard)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(DifflmError, match="has no tokenizer"):
        check_snapshot(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(DifflmError, match="holds a 'llama' model"):
        check_snapshot(folder)


@pytest.mark.parametrize(
    ("family", "lines"),
    [
        ("llada", [
            r"model\.transformer\.blocks\.0\.q_proj\.weight  x2 layers +->  LLaDABlock\.q_proj\.weight \(Linear\) +\[32, 32\] +F32 +ok",
            r"model\.transformer\.blocks\.0\.k_proj\.weight  x2 layers +->  LLaDABlock\.k_proj\.weight \(Linear\) +\[16, 32\] +F32 +ok",
            r"model\.transformer\.wte\.weight +->  LLaDAStack\.transformer\.wte\.weight \(Embedding\) +\[64, 32\] +F32 +ok",
        ]),
        ("dream", [
            r"model\.layers\.0\.self_attn\.q_proj\.bias  x2 layers +->  Attention\.q_proj\.bias \(Linear\) +\[32\] +F32 +ok",
            r"model\.norm\.weight +->  DreamBaseModel\.norm\.weight \(RMSNorm\) +\[32\] +F32 +ok",
            r"lm_head\.weight +->  DreamForMaskedLM\.lm_head\.weight \(Linear\) +\[64, 32\] +F32 +ok",
        ]),
    ],
)  # fmt: skip
def test_inspect_maps_every_published_key_onto_difflm(tmp_path, capsys, family, lines):
    folder = published_folder(tmp_path, family)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    for line in lines:
        assert any(re.fullmatch(line, text.rstrip()) for text in out), line
    keys = len(FAMILIES[family]().state_dict())
    assert out[-1] == f"{keys} ok"

    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    lost = [text for text in out if text.rstrip().endswith(f"shard missing ({shard.name})")]
    assert lost and out[-1] == f"{keys - len(lost)} ok, {len(lost)} shard missing"


def test_inspect_reports_missing_and_unexpected_keys(tmp_path, capsys):
    folder = published_folder(tmp_path, "llada")
    weights = dict(tiny_llada().state_dict())
    weights.pop("model.transformer.blocks.1.ff_norm.weight")
    weights["model.transformer.rotary.inv_freq"] = torch.ones(4)
    for file in folder.glob("model*.safetensors*"):
        file.unlink()
    save_file(weights, folder / "model.safetensors")
    assert main(["inspect", str(folder)]) == 0
    out = [text.split() for text in capsys.readouterr().out.splitlines()]
    assert ["model.transformer.blocks.1.ff_norm.weight", "->", "LLaDABlock.ff_norm.weight", "(RMSNorm)",
            "[32]", "-", "missing"] in out  # fmt: skip
    assert ["model.transformer.rotary.inv_freq", "->", "-", "[4]", "F32", "unexpected"] in out
    assert ["model.transformer.blocks.0.ff_norm.weight", "->", "LLaDABlock.ff_norm.weight", "(RMSNorm)",
            "[32]", "F32", "ok"] in out  # the layer left alone is no group  # fmt: skip
