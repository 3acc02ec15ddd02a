"""SGDD decoding: the pretrained-initialised decoder, best-of-N, correction rounds, edit search, `--data`.

The decoder started from the encoder's weights must *be* the pretrained BERT at step 0 (every
conditioning path zero-initialised); verification may only ever move toward the target vector.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from difflm.errors import DifflmError
from difflm.evaluate import sgdd_verify as verify
from difflm.evaluate.sgdd import eval_sgdd, verification_of
from difflm.evaluate.sgdd_decode import cosine_to, decode_vectors, token_logprobs
from difflm.evaluate.sgdd_verify import (
    FLUENCY_POOL,
    GAIN,
    Hypotheses,
    SearchState,
    Verification,
    answer,
    best_of_n,
    correction_round,
    fluency_pool,
    insertion_proposals,
    merge_substitutions,
    search_round,
    single_edits,
    verified_decode,
    verified_search,
)
from difflm.models.bert_decoder import BertDecoder, rename_hf_key
from difflm.models.layers import rope_cos_sin
from difflm.models.sgdd import Shortlisted
from difflm.models.transformer import Transformer
from difflm.pretrained import load_pretrained
from difflm.sampling.denormals import denormals_flushed
from difflm.systems.registry import build_run
from difflm.systems.sgdd import load_encoder, split_examples
from difflm.train.trainer import train
from tests.test_sgdd import SENTENCES, eval_args, tiny_config

HEAD_KEYS = {
    "cls.predictions.transform.dense.weight": "head_dense.weight",
    "cls.predictions.transform.dense.bias": "head_dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head_norm.bias",
}


def hf_mlm_like(decoder: BertDecoder, config: BertConfig) -> BertForMaskedLM:
    """A HF BertForMaskedLM holding the decoder's weights (body as loaded, head as initialised)."""
    hf = BertForMaskedLM(config).eval()
    own = decoder.state_dict()
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            name = rename_hf_key(key)
            if name in own:
                value[: len(own[name])].copy_(own[name])  # positions: the decoder keeps block_size rows
    return hf


def test_conditioned_decoder_is_the_pretrained_mlm_at_step_zero():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    pretrained = BertForMaskedLM(config)
    decoder = BertDecoder(
        vocab_size=60, block_size=16, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, cond_dim=8,
        dropout=0.0, cond_tokens=3,
    ).eval()  # fmt: skip
    decoder.load_pretrained(pretrained.bert.state_dict())  # BertModel keys, as the encoder ships them
    hf = hf_mlm_like(decoder, config)
    ids = torch.randint(0, 60, (3, 12))
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 8:] = 0
    bias = torch.zeros(3, 1, 1, 12).masked_fill(attention[:, None, None, :] == 0, float("-inf"))
    expected = hf(input_ids=ids, attention_mask=attention).logits
    for cond, t in ((torch.randn(3, 8), torch.rand(3)), (None, None)):
        got = decoder(ids, attention_bias=bias, cond=cond, t=t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    where = ids % 2 == 0
    torch.testing.assert_close(
        decoder(ids, attention_bias=bias, logits_at=where), expected[where], atol=1e-5, rtol=1e-5
    )
    keep = torch.tensor([7, 3, 59])  # the tied head's rows and bias of a shortlist, in its order
    got = decoder(ids, attention_bias=bias, head=decoder.output_rows(keep))
    torch.testing.assert_close(got, expected[..., keep], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hidden_states_projected_later_equal_the_forwards_logits(trained):
    """An identity head returns the final hidden states; scoring them later (all V, or a shortlist
    head) gives exactly the logits the forward would have returned: the guided shortlist forward
    relies on it."""
    torch.manual_seed(0)
    bert = BertDecoder(
        vocab_size=60, block_size=16, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, cond_dim=8,
        dropout=0.0, cond_tokens=3,
    ).eval()  # fmt: skip
    sgdd = load_pretrained(trained / "run").model
    for model in (bert, sgdd.decoder):
        width, vocab = model.tok_emb.weight.shape[1], model.tok_emb.weight.shape[0]
        ids, at = torch.randint(0, vocab, (2, 12)), torch.rand(2, 12) < 0.5
        h = model(ids, logits_at=at, head=(torch.eye(width), None))
        assert h.shape == (int(at.sum()), width)
        assert torch.equal(model.project_hidden(h), model(ids, logits_at=at))
        keep = model.output_rows(torch.tensor([5, 1, 9]))
        assert torch.equal(model.project_hidden(h, keep), model(ids, logits_at=at, head=keep))
    ids = torch.randint(0, sgdd.config.vocab_size, (2, 12))
    assert torch.equal(sgdd.project_hidden(sgdd(ids, head=sgdd.hidden_head())), sgdd(ids))


def conditioned_bert_decoder() -> BertDecoder:
    """A tiny BERT decoder whose conditioning paths are no longer zero (a stand-in for training)."""
    torch.manual_seed(0)
    decoder = BertDecoder(
        vocab_size=60, block_size=16, n_layer=2, n_head=4, n_embd=32, ffn_hidden=64, cond_dim=8,
        dropout=0.0, cond_tokens=3,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for module in [*decoder.modulations, *(cross.out_proj for cross in decoder.cross)]:
            for param in module.parameters():
                param.normal_(0, 0.3)
    return decoder


def test_bert_decoder_precomputed_conditioning_gives_the_same_logits():
    decoder = conditioned_bert_decoder()
    rows = torch.randn(3, 8)
    fixed = decoder.conditioning(rows, torch.tensor([0.0, 0.5, 1.0]))
    ids, at, t = torch.randint(0, 60, (4, 12)), torch.tensor([2, 0, 1, 2]), torch.tensor([1.0, 0.5, 0.0, 0.5])
    with torch.no_grad():
        plain = decoder(ids, t=t, cond=rows[at])
        got = decoder(ids, t=t, conditioning=fixed, cond_rows=at)
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(decoder(ids, t=t, conditioning=fixed, cond_rows=at.flip(0)), plain)
        with pytest.raises(DifflmError, match="grid"):
            decoder(ids, t=torch.tensor([1.0, 0.25, 0.0, 0.5]), conditioning=fixed, cond_rows=at)


def test_encoder_initialised_sgdd_starts_as_minilm(tmp_path):
    cfg = tiny_config(tmp_path, "model.decoder=encoder", "model.cond_tokens=2", "model.block_size=16")
    run = build_run(cfg)
    model, encoder = run.model.eval(), load_encoder(cfg.model.encoder)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (6, 384, 12)  # filled in from MiniLM
    body = encoder.model.state_dict()
    assert torch.equal(model.decoder.layers[5].up.weight, body["encoder.layer.5.intermediate.dense.weight"])
    ids = torch.tensor([[2023, 103, 2003, 103, 1012]])
    z = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    a = model(ids.expand(2, -1), cond=z)
    b = model(ids.expand(2, -1), cond=z.flip(0), cond_drop=torch.tensor([True, False]))
    torch.testing.assert_close(a, b)  # the vector has no effect before training
    assert not [k for k in model.state_dict() if k.startswith("encoder")]  # the frozen encoder is not saved


def test_bad_decoder_choice(tmp_path):
    with pytest.raises(DifflmError, match="model.decoder"):
        tiny_config(tmp_path, "model.decoder=gpt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short phase-1 run on the tiny corpus (enough steps for non-uniform confidences)."""
    tmp = tmp_path_factory.mktemp("sgdd_decode")
    cfg = tiny_config(tmp, "train.max_steps=30", "train.lr=3e-3", "system.sample_steps=4")
    train(cfg, build_run(cfg))
    return tmp


def test_t_grid_holds_every_mask_fraction_exactly(trained):
    model = load_pretrained(trained / "run").model
    pad, mask = model.config.pad_token_id, model.mask_token_id
    for n in range(1, model.max_length + 1):
        ids = torch.full((n + 1, model.max_length), pad)
        ids[:, :n] = 7
        for k in range(n + 1):
            ids[k, :k] = mask  # row k: k of its n tokens masked
        real = ids != pad
        grid = model.t_grid(real)
        assert torch.isin(model.mask_fraction(ids), grid).all() and len(grid) == n + 1


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_precomputed_conditioning_decodes_the_same_text(trained, monkeypatch, cfg_scale):
    pre = load_pretrained(trained / "run")
    assert pre.model.config.time_conditioning and pre.model.config.cond_tokens
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:6])
    lengths = torch.tensor([3, 7, 5, 7, 2, 6])  # rows finish at different steps
    computed = []
    plain_conditioning = Transformer._conditioning
    monkeypatch.setattr(Transformer, "_conditioning", lambda *a: computed.append(1) or plain_conditioning(*a))
    fixed = decode_vectors(pre, vectors, cfg_scale=cfg_scale, lengths=lengths)
    assert not computed  # every forward picked its rows and t from the precomputed tables
    one = [
        decode_vectors(pre, vectors[i : i + 1], cfg_scale=cfg_scale, lengths=lengths[i : i + 1])[0]
        for i in range(6)
    ]
    none_given = lambda self, vectors, t_grid=None, null=True: None  # noqa: E731
    monkeypatch.setattr(type(pre.model), "conditioning", none_given)
    assert fixed == one == decode_vectors(pre, vectors, cfg_scale=cfg_scale, lengths=lengths)


def test_best_of_n_keeps_the_closest_candidate(trained):
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vectors = encoder.encode(SENTENCES[:5])
    settings = Verification(candidates=4, length_topk=2, temperature=1.0)
    found = best_of_n(pre, encoder, vectors, settings, 2.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(found.cosine, cosine_to(encoder, pre, found.ids, found.lengths, vectors))
    plain = decode_vectors(pre, vectors, cfg_scale=2.0)  # candidate 0: greedy at the top length
    ids = torch.zeros(5, max(map(len, plain)), dtype=torch.long)
    for row, seq in enumerate(plain):
        ids[row, : len(seq)] = torch.tensor(seq)
    plain_cos = cosine_to(encoder, pre, ids, torch.tensor([len(s) for s in plain]), vectors)
    assert (found.cosine >= plain_cos - 1e-6).all()


def test_correction_never_lowers_similarity(trained):
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vectors = encoder.encode(SENTENCES[5:11])
    settings = Verification(candidates=3, temperature=1.5, remask=0.5)
    gen = torch.Generator().manual_seed(1)
    current = best_of_n(pre, encoder, vectors, Verification(), 2.0, gen)
    for _ in range(3):
        after = correction_round(pre, encoder, vectors, current, settings, 2.0, gen)
        assert (after.cosine >= current.cosine).all() and torch.equal(after.lengths, current.lengths)
        torch.testing.assert_close(after.cosine, cosine_to(encoder, pre, after.ids, after.lengths, vectors))
        current = after


def test_greedy_edit_search_only_moves_closer_and_stops_when_stuck(trained):
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vectors = encoder.encode(SENTENCES[:6])
    start = best_of_n(pre, encoder, vectors, Verification(), 0.0, torch.Generator().manual_seed(0))
    greedy = Verification(search=4, search_k=3, patience=1)
    state, active = SearchState.start(start), torch.ones(6, dtype=torch.bool)
    for _ in range(4):
        before = [state.best(row) for row in range(6)]
        sizes = [len(scored) for scored in state.scored]
        still = search_round(pre, encoder, vectors, state, active, greedy)
        after = [state.best(row) for row in range(6)]
        assert all(a[0] >= b[0] for a, b in zip(after, before, strict=True))
        closer = torch.tensor([a[0] > b[0] + GAIN for a, b in zip(after, before, strict=True)])
        assert torch.equal(still, active & closer)  # patience 1: rows that found nothing closer stop
        done = (~active).nonzero()[:, 0].tolist()
        assert [len(state.scored[row]) for row in done] == [sizes[row] for row in done]  # left alone
        for row, (cos, seq) in enumerate(after):  # the remembered cosine is the re-encoded one
            assert cos == pytest.approx(cosine_to_list(encoder, pre, seq, vectors[row : row + 1]).item(), abs=1e-5)
        active = still
    searched = verified_decode(pre, encoder, vectors, greedy, cfg_scale=0.0)
    assert searched.as_lists() == [seq for _, seq in after]  # the same rounds through the entry point
    given = torch.tensor([3, 4, 5, 3, 4, 5])
    fixed = verified_decode(pre, encoder, vectors, Verification(search=3), cfg_scale=0.0, lengths=given)
    assert torch.equal(fixed.lengths, given)  # a length the caller gave is kept


def test_patient_search_goes_on_from_the_next_closest_text(trained):
    """A sentence no single edit brings closer is not dropped: the next round expands the closest
    text not expanded yet, and the search stops after `patience` such rounds."""
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vector = encoder.encode(["a dog ran home."])
    seq = pre.tokenizer.tok("a dog ran home.", add_special_tokens=False)["input_ids"]
    start = Hypotheses(torch.tensor([seq]), torch.tensor([len(seq)]), cosine_to_list(encoder, pre, seq, vector))
    state, active = SearchState.start(start), torch.ones(1, dtype=torch.bool)  # the target: nothing is closer
    patient = Verification(search=3, search_k=4, patience=2)
    expanded = []
    for stall in (1, 2):
        active = search_round(pre, encoder, vector, state, active, patient)
        new = state.expanded[0] - set(expanded)
        assert len(new) == 1 and state.stall[0] == stall and active.item() == (stall < 2)
        expanded += new
    assert expanded[0] == tuple(seq) and state.best(0) == (start.cosine.item(), seq)
    second = max((c, s) for s, c in state.scored[0].items() if s != tuple(seq))
    assert expanded[1] == second[1]  # after the start, its closest edit


def test_wide_search_expands_the_closest_unexpanded_texts(trained):
    """width 2: every round expands the two closest texts of a sentence not expanded yet."""
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vector = encoder.encode(["a dog ran home."])
    seq = pre.tokenizer.tok("a dog ran home.", add_special_tokens=False)["input_ids"]
    start = Hypotheses(torch.tensor([seq]), torch.tensor([len(seq)]), cosine_to_list(encoder, pre, seq, vector))
    state, active = SearchState.start(start), torch.ones(1, dtype=torch.bool)
    wide = Verification(search=2, search_k=4, width=2, patience=3)
    search_round(pre, encoder, vector, state, active, wide)
    assert state.expanded[0] == {tuple(seq)}  # only one text to expand at first
    closest = state.frontier(0, 2)
    fresh = sorted(((c, s) for s, c in state.scored[0].items() if s != tuple(seq)), reverse=True)
    assert closest == [s for _, s in fresh[:2]]
    search_round(pre, encoder, vector, state, active, wide)
    assert state.expanded[0] == {tuple(seq), *closest}


def test_edit_search_reaches_the_sentence_one_edit_away(trained, monkeypatch):
    """From the target with one word missing, changed or added, one round finds the target when the
    decoder proposes the word (its proposals here: the word among others), and the target then wins
    (cosine 1); without the word among the proposals the round can still only move closer."""
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    target = pre.tokenizer.tok("a dog ran home.", add_special_tokens=False)["input_ids"]
    dog, noise = target[1], [2000, 2003, 2009]  # "to", "is", "it"
    vector = encoder.encode(["a dog ran home."])

    def propose(word, sure=False):
        def substitutions(pre, vectors, ids, real, k):
            subs = torch.tensor(noise + [word])[None, None, :].expand(*ids.shape, 4).clone()
            return torch.full(ids.shape, 0.0 if sure else -3.0), subs  # log p of the current tokens

        def insertions(pre, vectors, seqs, k):
            return [[noise[:2] + [word]] * (len(seq) + 1) for seq in seqs]

        monkeypatch.setattr(verify, "masked_predictions", substitutions)
        monkeypatch.setattr(verify, "insertion_proposals", insertions)

    wrong = [  # (hypothesis, whether reaching the target needs "dog" proposed)
        (target[:1] + target[2:], True),  # dog missing
        (target[:1] + [2003] + target[2:], True),  # dog -> is
        (target[:2] + [2009] + target[2:], False),  # an "it" added: a deletion
        (target[:1] + [target[2], dog] + target[3:], False),  # "a ran dog home.": a swap
    ]

    def one_round(seq):
        """(closest text, its cosine, still searching) after one greedy round from seq."""
        hyp = Hypotheses(torch.tensor([seq]), torch.tensor([len(seq)]), cosine_to_list(encoder, pre, seq, vector))
        state = SearchState.start(hyp)
        still = search_round(pre, encoder, vector, state, torch.ones(1, dtype=torch.bool), greedy)
        cos, found = state.best(0)
        assert cos >= hyp.cosine.item()
        return found, cos, still.item()

    greedy = Verification(search=1, search_k=4, patience=1)
    for seq, needs_word in wrong:
        propose(dog)
        found, cos, still = one_round(seq)
        assert found == target and still and cos == pytest.approx(1.0, abs=1e-5)
        propose(2001)  # "of": the decoder does not propose "dog"
        assert (one_round(seq)[0] == target) != needs_word
    propose(dog, sure=True)  # sure of every current token: "is" is not replaced by "dog"
    assert one_round(wrong[1][0])[0] != target


def test_single_edits_lists_every_edit_one_step_away():
    edits = single_edits([1, 2, 2], [[9], [8], [7]], [[5]] * 4)
    same_length = [
        ([9, 2, 2], (0, 9)), ([1, 8, 2], (1, 8)), ([1, 2, 7], (2, 7)),  # substitutions
        ([2, 1, 2], None),  # swaps of unequal neighbours only
    ]
    assert edits == same_length + [
        ([2, 2], None), ([1, 2], None), ([1, 2], None),  # deletions
        ([5, 1, 2, 2], None), ([1, 5, 2, 2], None), ([1, 2, 5, 2], None), ([1, 2, 2, 5], None),  # insertions
    ]
    assert single_edits([1, 2, 2], [[9], [8], [7]], None) == same_length  # a fixed length
    assert single_edits([4], [[]], []) == []  # one token, no proposals: nothing to try


def cosine_to_list(encoder, pre, seq: list[int], vector: torch.Tensor) -> torch.Tensor:
    return cosine_to(encoder, pre, torch.tensor([seq]), torch.tensor([len(seq)]), vector)


def test_merge_applies_each_improving_position_once():
    seqs = [[1, 2, 3], [4, 5], [6, 7]]
    owner = [0, 0, 0, 0, 1, 1, 2]
    swaps = [(0, 9), (0, 8), (2, 7), None, (0, 3), (1, 3), (1, 1)]
    cos = torch.tensor([0.6, 0.7, 0.55, 0.9, 0.8, 0.2, 0.9])
    baseline = torch.tensor([0.5, 0.5, 0.5])
    merged = merge_substitutions(seqs, owner, swaps, cos, baseline)
    # row 0: position 0 best 8 (0.7 > 0.6), position 2 -> 7; the deletion is not a substitution.
    # row 1: only one improving position; row 2: one position: nothing to merge.
    assert merged == {0: [8, 2, 7]}


def test_insertion_proposals_cover_every_gap_without_specials(trained):
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:2])
    full = [1037] * pre.model.max_length  # already max_length long: nothing can be inserted
    proposals = insertion_proposals(pre, vectors, [[2023, 4937, 1012], full], 5)
    assert len(proposals[0]) == 4 and all(len(top) == 5 for top in proposals[0]) and proposals[1] == []
    specials = set(pre.tokenizer.special_ids)
    assert not specials & {token for top in proposals[0] for token in top}


def test_shortlist_scores_its_tokens_as_the_full_head_and_only_them(trained):
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:2])
    ids = torch.tensor([[103, 103, 103, 1012], [103, 103, 0, 0]])
    bias = torch.zeros(2, 1, 1, 4).masked_fill((ids == 0)[:, None, None, :], float("-inf"))
    full = pre.model(ids, attention_bias=bias, cond=vectors)  # [2, 4, V]
    keep = torch.tensor([5, 1996, 2023, 1012])
    short = pre.model(ids, attention_bias=bias, cond=vectors, head=pre.model.output_rows(keep))
    torch.testing.assert_close(short, full[..., keep])
    # the shortlist as the whole vocabulary: inputs and logits are indices into it
    compact = Shortlisted(pre.model, torch.tensor([2023, 103, 0, 1012, 5, 1996]))
    assert compact.vocab.tolist() == [0, 5, 103, 1012, 1996, 2023] and compact.mask_token_id == 2
    at = compact.index(ids)
    assert at.tolist() == [[2, 2, 2, 3], [2, 2, 0, 0]]
    torch.testing.assert_close(compact(at, attention_bias=bias, cond=vectors), full[..., compact.vocab])
    with pytest.raises(DifflmError, match="shortlist lacks"):
        compact.index(torch.tensor([[103, 7]]))
    # the decoder reads system.shortlist: a shortlist of the whole vocabulary decodes as no shortlist
    pre.config.system["shortlist"] = 0
    whole = decode_vectors(pre, vectors, cfg_scale=2.0)
    pre.config.system["shortlist"] = full.shape[-1]
    assert decode_vectors(pre, vectors, cfg_scale=2.0) == whole


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_the_shortlist_forward_answers_the_first_step(trained, monkeypatch, cfg_scale):
    """The shortlist comes from the decode's first forward: that step does not run again (under
    guidance the forward also held the unconditional rows), and the tokens are those of running it."""
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:2])
    lengths = torch.tensor([5, 3])
    rows = []
    forward = pre.model.decoder.forward

    def counted(ids, **kw):
        rows.append(len(ids))
        return forward(ids, **kw)

    monkeypatch.setattr(pre.model.decoder, "forward", counted)
    remembered = decode_vectors(pre, vectors, cfg_scale=cfg_scale, lengths=lengths)
    calls_with, rows_with = len(rows), sum(rows)
    rows.clear()
    monkeypatch.setattr(Shortlisted, "remember", lambda self, *args: None)  # every step runs
    assert decode_vectors(pre, vectors, cfg_scale=cfg_scale, lengths=lengths) == remembered
    assert (len(rows), sum(rows)) == (calls_with + 1, rows_with + (2 if cfg_scale == 0 else 4))


def test_fluency_weighs_the_decoders_likelihood_against_the_cosine(trained):
    """Weight 0 answers the closest text; a huge weight the one the decoder finds likeliest given the
    vector (its summed pseudo-log-likelihood), but only among the `pool` closest."""
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:1])
    tok = pre.tokenizer.tok
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("a dog ran home.", "home ran a dog.", "dog a.")]
    ids = torch.zeros(3, 5, dtype=torch.long)
    for row, t in enumerate(texts):
        ids[row, : len(t)] = torch.tensor(t)
    pll = token_logprobs(pre, vectors.expand(3, -1), ids, ids != 0).masked_fill(ids == 0, 0.0).sum(1)
    order = pll.argsort().tolist()  # least likely first: it gets the best cosine, the likeliest the worst
    texts = [texts[i] for i in order]
    pll = pll[order]
    assert pll[0] < pll[1] < pll[2]
    cosines = [0.90, 0.89, 0.50]
    state = SearchState([{tuple(t): c for t, c in zip(texts, cosines, strict=True)}], [set()], [0])
    pool = fluency_pool(pre, vectors, state)
    assert pool.texts == [texts] and pool.cosines == [cosines]  # closest first
    torch.testing.assert_close(torch.tensor(pool.plls[0]), pll)
    assert pool.choose(0.0) == [(0.90, texts[0])]
    assert pool.choose(1e6) == [(0.50, texts[2])]
    assert fluency_pool(pre, vectors, state, 2).choose(1e6) == pool.choose(1e6, 2) == [(0.89, texts[1])]
    assert fluency_pool(pre, vectors, state, 1).choose(1e6) == pool.choose(1e6, 1) == [(0.90, texts[0])]
    w = 0.01  # a finite weight: the best cosine + w * pll, exactly
    pick = int(torch.tensor(cosines, dtype=torch.float64).add(w * pll.double()).argmax())
    assert pool.choose(w)[0][1] == texts[pick]
    with pytest.raises(DifflmError, match="fluency weight"):
        Verification(search=1, fluency=-1.0)
    with pytest.raises(DifflmError, match="--search S"):
        Verification(fluency=0.003)  # nothing to choose among without the search


def test_one_search_answers_every_fluency_weight(trained):
    """verified_search + answer(w) is verified_decode with fluency w, for each w, from one search."""
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vectors = encoder.encode(SENTENCES[:4])
    settings = Verification(candidates=2, search=2, search_k=3)
    state = verified_search(pre, encoder, vectors, settings, cfg_scale=0.0)
    assert all(len(scored) > 1 for scored in state.scored)  # the search scored more than its start
    pool = fluency_pool(pre, vectors, state)  # the pseudo-log-likelihoods, scored once for every weight
    for weight in (0.0, 0.01, 1e6):
        once = verified_decode(pre, encoder, vectors, replace(settings, fluency=weight), cfg_scale=0.0)
        for shared in (answer(pre, vectors, state, weight), answer(pre, vectors, state, weight, pool)):
            assert shared.as_lists() == once.as_lists() and torch.equal(shared.cosine, once.cosine)
    for size in (1, 2, FLUENCY_POOL):  # a smaller pool from the large one == that pool scored alone
        assert pool.choose(1e6, size) == fluency_pool(pre, vectors, state, size).choose(1e6)


def test_fluency_sweep_samples_training_sentences_and_answers_every_setting(trained, tmp_path):
    """benchmarks/sgdd_fluency.py: a seeded sample of the training split only (never a held-out
    sentence, none over --max-tokens), one row per (pool, weight), weight 0 the same for any pool."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sgdd_fluency.py"
    spec = importlib.util.spec_from_file_location("bench_sgdd_fluency", script)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    pre = load_pretrained(trained / "run")
    args = argparse.Namespace(examples=10, sample_seed=1, max_tokens=8)
    sample = sweep.training_sample(pre, args)
    held = {source for source, _ in split_examples(pre.config, "val")}
    assert len(sample) == 10 and sample == sweep.training_sample(pre, args)
    assert not held & {source for source, _ in sample}
    assert all(len(pre.tokenizer.tok(s, add_special_tokens=False)["input_ids"]) <= 8 for s, _ in sample)
    out = tmp_path / "sweep.json"
    subprocess.run(
        [sys.executable, str(script), "--run", str(trained / "run"), "--examples", "6", "--best-of", "2",
         "--search", "1", "--pools", "1,3", "--weights", "0,1e6", "--out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pool"], r["F"]) for r in rows] == [(1, 0.0), (1, 1e6), (3, 0.0), (3, 1e6)]
    assert rows[0] == {**rows[2], "pool": 1} and rows[0] == {**rows[1], "F": 0.0}  # pool 1: nothing to choose


def test_token_logprobs_mask_each_token_once(trained):
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:2])
    ids = torch.tensor([[2023, 4937, 2938, 2006, 1996, 1012], [1037, 3899, 2743, 0, 0, 0]])
    real = ids != 0
    logp = token_logprobs(pre, vectors, ids, real)
    assert torch.isinf(logp[~real]).all() and (logp[real] <= 0).all()
    # position 1 alone masked gives the same score (its group is positions 1 and 5)
    masked = ids.clone()
    masked[0, [1, 5]] = 103
    bias = torch.zeros(2, 1, 1, 6).masked_fill(~real[:, None, None, :], float("-inf"))
    direct = pre.model(masked, attention_bias=bias, cond=vectors).log_softmax(-1)[0, 1, 4937]
    torch.testing.assert_close(logp[0, 1], direct)


def test_eval_scores_a_file_with_verification(trained):
    pre = load_pretrained(trained / "run")
    lines = trained / "mine.txt"
    lines.write_text("the cat sat on the mat.\n\nan owl flew over the barn.\n", encoding="utf-8")
    metrics = eval_sgdd(pre, eval_args(data=str(lines), best_of=2, rounds=1, search=1))
    assert metrics["examples"] == 2 and metrics["split"] == "file"
    for name in ("cfg0", "cfg2", "cfg2_n2_r1_s1"):
        assert 0 <= metrics[f"{name}_exact_match"] <= 1 and metrics[f"{name}_ms_per_sentence"] > 0
    assert metrics["cfg2_examples"][1]["source"] == "an owl flew over the barn."
    unguided = eval_sgdd(pre, eval_args(data=str(lines), cfg_scale=0.0, search=1))
    assert {k.split("_")[0] for k in unguided if k.startswith("cfg")} == {"cfg0"}  # no guided rows
    assert "cfg0_oracle_len_bleu" in unguided and "cfg0_n1_r0_s1_bleu" in unguided
    fluent = eval_sgdd(pre, eval_args(data=str(lines), cfg_scale=0.0, search=1, fluency=0.003))
    assert "cfg0_n1_r0_s1_f0.003_bleu" in fluent  # the key names the fluency weight
    pairs = trained / "pairs.jsonl"
    pairs.write_text(json.dumps({"source": "a dog ran.", "target": "the dog was running."}) + "\n")
    paraphrase = eval_sgdd(pre, eval_args(data=str(pairs)))
    assert paraphrase["examples"] == 1 and paraphrase["copy_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert paraphrase["copy_exact_match"] == 0 and "copy_bleu" not in metrics  # only for real pairs


def test_search_flags_name_the_verification():
    assert verification_of(eval_args(best_of=4, search=12)) == Verification(candidates=4, search=12, patience=3)
    assert verification_of(eval_args(search=2, search_patience=1)).patience == 1  # greedy
    assert verification_of(eval_args(search=2, fluency=0.003)).fluency == 0.003


def test_cli_rejects_bad_verification_flags(trained):
    base = [sys.executable, "-m", "difflm.cli", "eval", str(trained / "run")]
    for flags, message in (
        (["--best-of", "0"], "--best-of must be >= 1"),
        (["--rounds", "-1"], "--rounds must be >= 0"),
        (["--search", "-2"], "--search must be >= 0"),
        (["--search-patience", "0"], "--search-patience must be >= 1"),
        (["--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0"),
        (["--fluency", "-0.1"], "--fluency must be a finite number >= 0"),
        (["--data", str(trained / "missing.txt")], "no such file"),
    ):
        proc = subprocess.run(base + flags, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_decoding_in_inference_mode_leaves_the_model_trainable(trained):
    pre = load_pretrained(trained / "run")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:2])
    lengths = torch.tensor([4, 6])
    rope_cos_sin.cache_clear()  # the decode below makes the rotary tables the training forward reads
    got = decode_vectors(pre, vectors, cfg_scale=2.0, lengths=lengths)
    with torch.no_grad():  # what the decode gave before it ran in inference mode
        assert decode_vectors.__wrapped__(pre, vectors, cfg_scale=2.0, lengths=lengths) == got
    ids = torch.tensor([[pre.tokenizer.mask_token_id] * 6] * 2)
    logits = pre.model.train()(ids, cond=vectors)  # the decode's cached tables serve training too
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in pre.model.decoder.blocks.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")
def test_every_decoder_forward_of_decoding_and_verification_flushes_denormals(trained, monkeypatch):
    pre = load_pretrained(trained / "run")
    encoder = load_encoder(pre.config.model.encoder)
    vectors = encoder.encode(SENTENCES[:3])
    flushed = []
    forward = type(pre.model).forward
    record = lambda *a, **k: flushed.append(denormals_flushed()) or forward(*a, **k)  # noqa: E731
    monkeypatch.setattr(type(pre.model), "forward", record)
    decode_vectors(pre, vectors, cfg_scale=2.0)
    current = best_of_n(pre, encoder, vectors, Verification(), 2.0, torch.Generator().manual_seed(0))
    correction_round(pre, encoder, vectors, current, Verification(candidates=2, remask=0.5), 2.0, None)
    token_logprobs(pre, vectors, current.ids, current.ids != pre.tokenizer.pad_token_id)
    assert flushed and all(flushed)
    assert not denormals_flushed()  # the caller's setting (off) is back


@torch.no_grad()
def test_int8_decoder_keeps_its_head_and_stays_close_to_float32(trained):
    """`int8_` quantizes every linear layer of the decoder but the tied output head (which the
    shortlist reads as a matrix); the logits move by a small fraction of their spread."""
    pre = load_pretrained(trained / "run")
    float32 = pre.model
    int8 = load_pretrained(trained / "run").model
    linears = [n for n, m in float32.decoder.named_modules() if type(m) is torch.nn.Linear]
    assert int8.int8_() == len(linears) - 1 and "lm_head" in linears
    assert int8.decoder.lm_head.weight is int8.decoder.tok_emb.weight  # still tied, still float32
    assert not any(type(m) is torch.nn.Linear for n, m in int8.decoder.named_modules() if n != "lm_head")
    vectors = load_encoder(pre.config.model.encoder).encode(SENTENCES[:4])
    ids = torch.full((4, 8), float32.mask_token_id)
    ids[:, ::3] = 2023  # a few known tokens
    exact, close = float32(ids, cond=vectors), int8(ids, cond=vectors)
    assert (close - exact).abs().max() < 0.05 * exact.std()
    assert (close.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    pre.model = int8
    lengths = torch.tensor([3, 5, 2, 4])
    texts = decode_vectors(pre, vectors, cfg_scale=2.0, lengths=lengths)
    assert [len(t) for t in texts] == lengths.tolist()


@torch.no_grad()
def test_int8_bert_decoder_stays_close_to_float32():
    decoder = conditioned_bert_decoder()
    ids, rows, t = torch.randint(0, 60, (3, 12)), torch.randn(3, 8), torch.tensor([1.0, 0.5, 0.0])
    exact = decoder(ids, t=t, cond=rows)
    linears = sum(type(m) is torch.nn.Linear for m in decoder.modules())
    assert decoder.int8_() == linears and not any(type(m) is torch.nn.Linear for m in decoder.modules())
    close = decoder(ids, t=t, cond=rows)  # a 32-wide toy: coarser than a real decoder's int8
    assert (close - exact).abs().mean() < 0.03 * exact.std()
    assert (close.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_eval_int8_names_its_weights(trained, capsys):
    from difflm.cli import main

    assert main(["eval", str(trained / "run"), "--int8", "--max-batches", "1", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["precision"] == "fp32, int8 decoder weights" and 0 <= metrics["cfg0_exact_match"] <= 1

