"""Qwen3-LLaDA: conversion is a pure copy, attention is bidirectional, block attention, inspect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from difflm.commands import convert as convert_command
from difflm.commands import inspect as inspect_command
from difflm.convert import EQUAL, SHAPE_DIFFERS, convert_qwen3, inspect_checkpoints, render_inspect_table
from difflm.errors import DifflmError
from difflm.models.block_attention import block_attention_bias
from difflm.models.qwen3_llada import Qwen3LLaDAConfig, Qwen3LLaDAForMaskedLM, as_denoiser

VOCAB = 64
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
N = float("-inf")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def save_qwen3(folder: Path, *, tied: bool, tokenizer: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY, tie_word_embeddings=tied)).eval()
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, Qwen3ForCausalLM]:
    """An untied Qwen3 with a tokenizer, converted once for the tests that only read."""
    root = tmp_path_factory.mktemp("qwen3")
    source = save_qwen3(root / "src", tied=False, tokenizer=True)
    convert_qwen3(str(root / "src"), str(root / "dst"))
    return root / "src", root / "dst", source


def causal_bias(length: int) -> torch.Tensor:
    return torch.full((length, length), N).triu(1)[None, None]  # [1, 1, L, L]


@pytest.mark.parametrize("tied", [False, True])
def test_convert_copies_weights_bit_identically(tmp_path, tied):
    source = save_qwen3(tmp_path / "src", tied=tied, tokenizer=True)
    report = convert_qwen3(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (report.mask_token_id, report.vocab_before, report.vocab_after) == (VOCAB, VOCAB, VOCAB + 1)
    assert report.token_added and report.has_tokenizer
    src_weights = load_file(tmp_path / "src" / "model.safetensors")
    dst_weights = load_file(tmp_path / "dst" / "model.safetensors")
    assert src_weights.keys() == dst_weights.keys()
    resized = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if not tied else set())
    for key, value in src_weights.items():
        if key in resized:
            assert torch.equal(dst_weights[key][:VOCAB], value), key
            torch.testing.assert_close(dst_weights[key][VOCAB], value.mean(dim=0))
        else:
            assert torch.equal(dst_weights[key], value), key
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["model_type"] == "qwen3_llada" and config["mask_token_id"] == VOCAB
    assert config["use_cache"] is False and config["vocab_size"] == VOCAB + 1
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "dst")
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == VOCAB
    assert source.config.vocab_size == VOCAB  # the source model object is untouched


def test_convert_without_tokenizer_appends_a_row(tmp_path):
    save_qwen3(tmp_path / "src", tied=True, tokenizer=False)
    report = convert_qwen3(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (report.mask_token_id, report.vocab_after, report.has_tokenizer) == (VOCAB, VOCAB + 1, False)


def test_convert_reuses_a_spare_embedding_row(tmp_path):
    """Real Qwen3 has more embedding rows than tokens: the mask takes a spare row, nothing changes."""
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**{**TINY, "vocab_size": VOCAB + 8})).save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    report = convert_qwen3(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (report.mask_token_id, report.vocab_before, report.vocab_after) == (VOCAB, VOCAB + 8, VOCAB + 8)
    src_weights = load_file(tmp_path / "src" / "model.safetensors")
    dst_weights = load_file(tmp_path / "dst" / "model.safetensors")
    assert all(torch.equal(dst_weights[key], value) for key, value in src_weights.items())


def test_causal_bias_reproduces_source_logits(converted):
    _, dst, source = converted
    model = AutoModelForMaskedLM.from_pretrained(dst).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    with torch.no_grad():
        expected = source(ids, attention_mask=padding).logits  # [B, L, V]
        got = model(ids, attention_bias=causal_bias(12), attention_mask=padding).logits  # [B, L, V+1]
    torch.testing.assert_close(got[0, :, :VOCAB], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :9, :VOCAB], expected[1, :9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bidirectional_by_default(converted, attn):
    _, dst, _ = converted
    model = AutoModelForMaskedLM.from_pretrained(dst, attn_implementation=attn).eval()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    later = ids.clone()
    later[0, 8] = (ids[0, 8] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(later).logits  # [1, L, V]
        causal = model(later, attention_bias=causal_bias(10)).logits
    assert not torch.allclose(before[0, 0], after[0, 0])  # position 0 sees position 8
    with torch.no_grad():
        torch.testing.assert_close(causal[0, :8], model(ids, attention_bias=causal_bias(10)).logits[0, :8])


def test_padding_keys_are_invisible(converted):
    """A padded row gives the same logits on its real tokens as the unpadded sequence, and no NaN."""
    _, dst, _ = converted
    model = AutoModelForMaskedLM.from_pretrained(dst).eval()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    padding = torch.tensor([[1] * 7 + [0] * 3])
    with torch.no_grad():
        padded = model(ids, attention_mask=padding).logits  # [1, 10, V]
        short = model(ids[:, :7]).logits  # [1, 7, V]
        blind = model(ids, attention_mask=torch.zeros_like(padding)).logits  # every key hidden
    torch.testing.assert_close(padded[:, :7], short, atol=1e-5, rtol=0)
    assert torch.isfinite(blind).all()


def test_save_load_round_trip_and_denoiser_adapter(converted, tmp_path):
    _, dst, _ = converted
    model = AutoModelForMaskedLM.from_pretrained(dst).eval()
    assert isinstance(model, Qwen3LLaDAForMaskedLM) and model.mask_token_id == VOCAB
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(0, VOCAB + 1, (2, 8), generator=torch.Generator().manual_seed(3))
    denoiser = as_denoiser(reloaded)
    with torch.no_grad():
        logits = denoiser(ids, attention_bias=None, t=torch.rand(2), cond=None)  # [B, L, V]
        assert torch.equal(logits, model(ids).logits)
    assert logits.shape == (2, 8, VOCAB + 1) and denoiser.mask_token_id == VOCAB


def test_converting_a_non_qwen3_checkpoint_raises(tmp_path):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(DifflmError, match="is a llama checkpoint, not Qwen3"):
        convert_qwen3(str(tmp_path / "llama"), str(tmp_path / "out"))
    with pytest.raises(DifflmError, match="no config.json"):
        convert_qwen3(str(tmp_path / "missing"), str(tmp_path / "out"))


def test_config_rejects_sliding_window_and_bad_mask_id():
    with pytest.raises(DifflmError, match="sliding-window"):
        Qwen3LLaDAConfig(**TINY, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(DifflmError, match="outside the vocabulary"):
        Qwen3LLaDAConfig(**TINY, mask_token_id=VOCAB)


def test_block_attention_bias_hand_written():
    # prompt 2, seq 6, block 2: positions [P P B0 B0 B1 B1]; row 2 pads its last position.
    own = [
        [0, 0, N, N, N, N],
        [0, 0, N, N, N, N],
        [0, 0, 0, 0, N, N],
        [0, 0, 0, 0, N, N],
        [0, 0, N, N, 0, 0],
        [0, 0, N, N, 0, 0],
    ]
    earlier = [
        [0, 0, N, N, N, N],
        [0, 0, N, N, N, N],
        [0, 0, 0, 0, N, N],
        [0, 0, 0, 0, N, N],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    own_padded = [row[:5] + [N] for row in own]
    prompts = torch.tensor([2, 2])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    bias = block_attention_bias(prompts, 6, 2, attention_mask=padding)
    assert bias.shape == (2, 1, 6, 6) and bias.dtype == torch.float32
    assert torch.equal(bias[:, 0], torch.tensor([own, own_padded]))
    assert torch.equal(
        block_attention_bias(prompts, 6, 2, see_earlier_blocks=True)[:, 0], torch.tensor([earlier] * 2)
    )


def test_block_attention_uneven_prompts_and_partial_last_block():
    # prompt 1, seq 6, block 3 -> [P B0 B0 B0 B1 B1]; prompt 3 -> [P P P B0 B0 B0].
    bias = block_attention_bias(torch.tensor([1, 3]), 6, 3, dtype=torch.bfloat16)
    visible = bias[:, 0] == 0  # [B, L, L]
    assert bias.dtype == torch.bfloat16
    assert visible[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 1, 1],
    ]
    assert visible[1].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 1, 1]] * 3


def test_block_length_longer_than_generation_raises():
    with pytest.raises(DifflmError, match="larger than the generation length 4"):
        block_attention_bias(torch.tensor([2]), 6, 5)
    with pytest.raises(DifflmError, match="block_length must be >= 1"):
        block_attention_bias(torch.tensor([2]), 6, 0)


def test_block_bias_in_the_model_hides_later_blocks(converted):
    _, dst, _ = converted
    model = AutoModelForMaskedLM.from_pretrained(dst).eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % VOCAB  # last block is positions 6..7
    bias = block_attention_bias(torch.tensor([2]), 8, 2, see_earlier_blocks=True)
    with torch.no_grad():
        before, after = model(ids, attention_bias=bias).logits, model(changed, attention_bias=bias).logits
    assert torch.equal(before[0, :6], after[0, :6])
    assert not torch.allclose(before[0, 6], after[0, 6])


def test_inspect_reports_only_the_embedding_change(converted, capsys):
    src, dst, _ = converted
    rows = inspect_checkpoints(str(src), str(dst))
    changed = {row.key: (row.shape_a, row.shape_b) for row in rows if row.status != EQUAL}
    assert changed == {
        "lm_head.weight": ((VOCAB, 32), (VOCAB + 1, 32)),
        "model.embed_tokens.weight": ((VOCAB, 32), (VOCAB + 1, 32)),
    }
    assert {row.status for row in rows} == {EQUAL, SHAPE_DIFFERS} and len(rows) == 25
    assert render_inspect_table(rows).caption == "23 equal, 2 shape differs"
    assert inspect_command.run(argparse.Namespace(src=str(src), dst=str(dst), diff_only=True)) == 0
    assert "model.embed_tokens.weight" in capsys.readouterr().out


def test_convert_command_prints_mask_id(tmp_path, capsys):
    save_qwen3(tmp_path / "src", tied=True, tokenizer=True)
    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    args = parser.parse_args(["--from", "qwen3", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert convert_command.run(args) == 0
    assert f"id {VOCAB}" in capsys.readouterr().out
    with pytest.raises(DifflmError, match="not empty"):
        convert_command.run(args)
