"""Tests for the frozen SGDD sentence encoder, its trainable head (VIB, whitening) and the cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflm.errors import DifflmError
from difflm.models.encoder import (
    VIB,
    EncoderConfig,
    SemanticEncoder,
    SemanticHead,
    Whitening,
    cached_encode,
    fingerprint,
    trainable_parameters,
)

SENTENCES = ["A cat sits on the mat.", "Stocks fell sharply today.", "The cat is on the rug."]


@pytest.fixture(scope="module")
def minilm() -> SemanticEncoder:
    return SemanticEncoder(EncoderConfig())


@pytest.fixture(scope="module")
def minilm_z(minilm) -> torch.Tensor:
    return minilm.encode(SENTENCES)  # [3, 384]


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"pooling": "max"}, {"max_length": 1}, {"vib_kl_weight": -1.0}, {"vib_dim": -2}, {"name_or_path": ""}],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(DifflmError):
        EncoderConfig(**kwargs)


# --- MiniLM (the offline default) -----------------------------------------------------------


def test_minilm_dim_and_normalised(minilm, minilm_z):
    z = minilm_z
    assert minilm.dim == 384
    assert z.shape == (3, 384) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    # Semantics sanity: the two cat sentences are closer to each other than to the stock one.
    sims = z @ z.T
    assert sims[0, 2] > sims[0, 1] and sims[0, 2] > sims[2, 1]


def test_minilm_mean_pooling_matches_hand_computation(minilm, minilm_z):
    z = minilm_z
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**batch).last_hidden_state  # [B, L, D]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(z, expected)


def test_minilm_deterministic(minilm, minilm_z):
    assert torch.equal(minilm.encode(SENTENCES), minilm_z)


def test_encoder_is_frozen_and_stays_in_eval(minilm):
    head = nn.Linear(minilm.dim, 1)
    loss = head(minilm.encode(SENTENCES)).square().sum()
    loss.backward()
    assert head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert minilm.training and not minilm.model.training
    assert not any(m.training for m in minilm.model.modules())
    minilm.eval()


def test_trainable_parameters_exclude_encoder(minilm):
    cfg = EncoderConfig(vib=True, vib_dim=16, whitening=True)
    system = nn.ModuleDict({"encoder": minilm, "head": SemanticHead(cfg, minilm.dim)})
    expected = {id(p) for p in system["head"].parameters()}
    assert {id(p) for p in trainable_parameters(system)} == expected
    # Even if someone unfreezes it by mistake, the encoder stays out of the optimizer.
    minilm.requires_grad_(True)
    try:
        assert {id(p) for p in trainable_parameters(system)} == expected
    finally:
        minilm.requires_grad_(False)
    assert system["head"].out_dim == 16


def test_empty_text_raises(minilm):
    with pytest.raises(DifflmError, match="empty text at index 1"):
        minilm.encode(["fine", "   "])
    with pytest.raises(DifflmError, match="no texts"):
        minilm.encode([])


def test_long_text_truncated_with_warning(minilm):
    long_text = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match="1 of 2 texts"):
        z = minilm.encode([long_text, "short"])
    # max_length=64 keeps [CLS] + 62 words + [SEP]: same vector as the text cut by hand.
    cut = minilm.encode([" ".join(["word"] * 62)])
    torch.testing.assert_close(z[:1], cut)


def test_token_embeddings_copy(minilm):
    emb = minilm.token_embeddings()
    assert emb.shape == (len(minilm.tokenizer), 384) and not emb.requires_grad
    emb.zero_()
    assert minilm.model.get_input_embeddings().weight.abs().sum() > 0


def test_cache_matches_fresh_and_skips_encoder(minilm, tmp_path):
    calls = []
    hook = minilm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = cached_encode(minilm, SENTENCES, tmp_path, batch_size=2, progress=False)
        assert len(calls) == 2  # two batches
        fresh = torch.cat([minilm.encode(SENTENCES[:2]), minilm.encode(SENTENCES[2:])])
        calls.clear()
        second = cached_encode(minilm, SENTENCES, tmp_path, batch_size=2, progress=False)
        assert calls == []
    finally:
        hook.remove()
    assert torch.equal(first, fresh) and torch.equal(second, first)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no temp file left
    # The key changes with the texts and with settings that change the vectors.
    cfg = minilm.config
    assert fingerprint(cfg, SENTENCES) != fingerprint(cfg, SENTENCES[::-1])
    assert fingerprint(cfg, ["ab", "c"]) != fingerprint(cfg, ["a", "bc"])
    assert fingerprint(cfg, SENTENCES) != fingerprint(EncoderConfig(pooling="cls"), SENTENCES)


# --- other encoders -------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["GPT2Config", "Qwen3Config"])
def test_decoder_rejected(tmp_path, config_name):
    import transformers

    kwargs = {"vocab_size": 64}
    if config_name == "GPT2Config":
        kwargs.update(n_layer=1, n_embd=32, n_head=2)
    else:
        kwargs.update(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
        kwargs.update(intermediate_size=64, head_dim=16)
    getattr(transformers, config_name)(**kwargs).save_pretrained(tmp_path)
    with pytest.raises(DifflmError, match="is not an encoder"):
        SemanticEncoder(EncoderConfig(name_or_path=str(tmp_path)))


def test_missing_encoder_raises(tmp_path):
    with pytest.raises(DifflmError, match="cannot load encoder"):
        SemanticEncoder(EncoderConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(DifflmError, match="cannot load encoder"):
        SemanticEncoder(EncoderConfig(name_or_path="no-such-org/no-such-encoder"))


def test_tiny_bert_from_folder_cls_pooling(minilm, tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert_cfg = BertConfig(
        vocab_size=len(minilm.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    BertModel(bert_cfg).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    enc = SemanticEncoder(
        EncoderConfig(name_or_path=str(tmp_path), pooling="cls", normalize=False, max_length=16)
    )
    assert enc.dim == 32
    z = enc.encode(SENTENCES)
    batch = enc.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = enc.model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(z, expected)
    with pytest.raises(DifflmError, match="exceeds"):
        SemanticEncoder(EncoderConfig(name_or_path=str(tmp_path), max_length=64))


# --- VIB --------------------------------------------------------------------------------------


def _hand_vib() -> VIB:
    """mu = z, log_sigma = (log 2, 0) whatever z is."""
    vib = VIB(2)
    with torch.no_grad():
        vib.mu.weight.copy_(torch.eye(2))
        vib.mu.bias.zero_()
        vib.log_sigma.weight.zero_()
        vib.log_sigma.bias.copy_(torch.tensor([math.log(2.0), 0.0]))
    return vib


def test_vib_kl_closed_form_and_inference_mean():
    vib = _hand_vib().eval()
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    out, kl = vib(z)
    # Row 1: 0.5 * [(1 + 4 - 1 - 2 ln 2) + (4 + 1 - 1 - 0)] = 4 - ln 2
    # Row 2: 0.5 * [(0 + 4 - 1 - 2 ln 2) + (0 + 1 - 1 - 0)] = 1.5 - ln 2
    expected = ((4 - math.log(2)) + (1.5 - math.log(2))) / 2
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(out, z)


def test_vib_training_sample_reproducible():
    vib = _hand_vib().train()
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    a, _ = vib(z, generator=torch.Generator().manual_seed(0))
    b, _ = vib(z, generator=torch.Generator().manual_seed(0))
    c, _ = vib(z, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, z + torch.tensor([2.0, 1.0]) * eps)
    mean, _ = vib(z, sample=False)
    assert torch.equal(mean, z)


def test_head_without_vib_is_identity():
    head = SemanticHead(EncoderConfig(), 4)
    z = torch.randn(3, 4)
    out, kl = head(z)
    assert torch.equal(out, z) and kl.item() == 0.0 and list(head.parameters()) == []


# --- whitening --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitening_identity_covariance(method, tmp_path):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g) + 2 * torch.eye(8)
    embs = torch.randn(400, 8, generator=g) @ mix + 3.0  # [N, D] correlated, off-centre
    white = Whitening.fit(embs, eps=1e-9, method=method)
    out = white(embs).double()
    torch.testing.assert_close(out.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)
    if method == "zca":
        torch.testing.assert_close(white.matrix, white.matrix.T)
    # Round trip through safetensors into a fresh module.
    save_file(white.state_dict(), tmp_path / "w.safetensors")
    loaded = Whitening(8)
    loaded.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(loaded(embs), white(embs))


def test_whitening_errors():
    with pytest.raises(DifflmError, match="not fitted"):
        Whitening(4)(torch.zeros(1, 4))
    with pytest.raises(DifflmError, match="unknown"):
        Whitening.fit(torch.randn(10, 4), method="pcaa")
    with pytest.raises(DifflmError, match="N >= 2"):
        Whitening.fit(torch.randn(1, 4))


def test_whitening_fitted_on_fewer_vectors_than_dims_drops_unseen_directions():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(5, 16, generator=g)  # rank <= 4 after centring
    with pytest.warns(UserWarning, match="singular"):
        white = Whitening.fit(train)
    new = torch.randn(3, 16, generator=g)
    assert white(new).abs().max() < 10  # not blown up by 1/sqrt(eps) along unseen directions
    out = white(train).double()
    cov = (out - out.mean(0)).T @ (out - out.mean(0)) / 4
    eig = torch.linalg.eigvalsh(cov)
    torch.testing.assert_close(eig[-4:], torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)  # seen: unit
    assert eig[:-4].abs().max() < 1e-6  # unseen: zero
