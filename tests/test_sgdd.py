"""SGDD: frozen encoder kept out of weights and optimizer, CFG dropout, guidance, end to end, errors.

Referenced, not repeated here: AdaLN-Zero blocks start as identity (test_transformer), the VIB KL
closed form and cached embeddings == fresh ones (test_encoder).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflm.config import load_config
from difflm.errors import DifflmError
from difflm.evaluate.options import EvalOptions
from difflm.evaluate.sgdd import decode_vectors, eval_sgdd, sample_sgdd
from difflm.models.sgdd import project_table
from difflm.pretrained import load_pretrained
from difflm.sampling.settings import SampleOptions
from difflm.sampling.unmask import SampleConfig, infill
from difflm.systems.registry import build_run
from difflm.systems.sgdd import load_encoder, split_examples, tokenize_targets
from difflm.train.optim import build_optimizer
from difflm.train.trainer import TrainState, _next_indices, collate, step_generator, train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SENTENCES = [
    "the cat sat on the mat.", "a dog ran in the park.", "she reads a book at night.",
    "we walked to the old bridge.", "he likes green tea.", "the sun is bright today.",
    "my brother plays the piano.", "they built a small house.", "rain fell on the roof.",
    "the train left early.", "birds sing in the morning.", "i lost my blue pen.",
    "the river is very cold.", "she painted the door red.", "we ate bread and cheese.",
    "the child laughed loudly.", "snow covered the hills.", "he opened the window.",
    "the shop closes at nine.", "a ship sailed past the rocks.",
]  # fmt: skip
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.ffn_hidden=64", "model.block_size=16",
    "model.dropout=0.0", "train.batch_size=8", "train.max_steps=3", "train.warmup_steps=1",
    "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
    "model.embedding_init=random", "system.holdout=4", "system.encode_batch_size=32", "system.sample_steps=2",
]  # fmt: skip


def tiny_config(tmp: Path, *extra: str, recipe: str = "sgdd_phase1"):
    corpus = tmp / "sentences.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    overrides = [
        *TINY,
        f"data.path={corpus}",
        f"data.cache_dir={tmp / 'cache'}",
        f"train.output_dir={tmp / 'run'}",
    ]
    return load_config(RECIPES / f"{recipe}.yaml", [*overrides, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step phase-1 run with a VIB (so the head has parameters); returns its folder."""
    tmp = tmp_path_factory.mktemp("sgdd")
    cfg = tiny_config(tmp, "model.encoder.vib=true", "model.encoder.vib_dim=16")
    run = build_run(cfg)
    encoder = load_encoder(cfg.model.encoder)
    encoder_ids = {id(p) for p in encoder.parameters()}
    optimizer_ids = {id(p) for g in build_optimizer(run.model, cfg.train).param_groups for p in g["params"]}
    assert not encoder_ids & optimizer_ids and not encoder_ids & {id(p) for p in run.model.parameters()}
    train(cfg, run)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    return tmp / "run"


def test_checkpoint_holds_decoder_and_head_but_not_encoder(trained):
    keys = set(load_file(str(trained / "checkpoints/step-3/model.safetensors")))
    assert {"head.vib.mu.weight", "length_head.0.weight"} <= keys
    assert {"decoder.tok_emb.weight", "decoder.lm_head.weight"} & keys  # tied: stored once
    assert not [k for k in keys if "encoder" in k or "attention.self" in k]  # no MiniLM tensor
    pre = load_pretrained(trained)
    assert pre.tokenizer.mask_token_id == 103 and pre.model.config.vocab_size == 30522


def eval_args(**kw) -> EvalOptions:
    return EvalOptions(**{"batch_size": 4, "json": True, **kw})


def sample_args(**kw) -> SampleOptions:
    return SampleOptions(**{"batch_size": 4, "json": True, **kw})


def test_eval_and_sample_after_training(trained, capsys):
    pre = load_pretrained(trained)
    metrics = eval_sgdd(pre, eval_args())
    assert metrics["examples"] == 4 and metrics["loss"] > 0 and metrics["split"] == "val"
    train_metrics = eval_sgdd(pre, eval_args(split="train", max_batches=1))
    assert train_metrics["examples"] == 4 and train_metrics["split"] == "train"
    held = {s for s, _ in split_examples(pre.config, "val")}
    assert not held & {s for s, _ in split_examples(pre.config, "train")}  # disjoint splits
    for name in ("cfg0", "cfg2", "cfg2_oracle_len"):
        assert 0 <= metrics[f"{name}_exact_match"] <= 1 and 0 <= metrics[f"{name}_token_acc"] <= 1
        assert 0 <= metrics[f"{name}_bleu"] <= 100 and -1 <= metrics[f"{name}_cosine"] <= 1
    assert sample_sgdd(pre, sample_args(text=["the cat sat."], length=3)) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input"] == "the cat sat." and len(pre.tokenizer.encode(out["output"])) >= 1
    assert sample_sgdd(pre, sample_args(interpolate=("the cat sat.", "a dog ran."), alpha=0.25)) == 0
    capsys.readouterr()
    assert sample_sgdd(pre, sample_args(text=["the cat sat."], length=3, search=2)) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(pre.tokenizer.tok(out["output"], add_special_tokens=False)["input_ids"]) <= 3  # length kept


def test_uncond_prob_one_hides_the_vector(tmp_path):
    run = build_run(tiny_config(tmp_path, "system.uncond_prob=1.0", "model.dropout=0.0"))
    batch = run.objective.prepare(collate([run.train_data[i] for i in range(8)]), step_generator(0, 0))
    assert batch["cond_drop"].all()
    other = {**batch, "cond": torch.randn_like(batch["cond"])}
    a, _ = run.objective.diffusion.loss(run.model, batch)
    b, _ = run.objective.diffusion.loss(run.model, other)
    assert torch.equal(a, b)  # the decoder's loss does not depend on the vector at all


def test_extra_data_trains_on_more_texts_but_never_on_held_out_ones(tmp_path):
    base = build_run(tiny_config(tmp_path))
    held = [t for _, t in split_examples(tiny_config(tmp_path), "val")]
    extra = tmp_path / "extra.txt"
    extra.write_text("the moon rose over the sea.\na new sentence here.\n" + held[0] + "\n", encoding="utf-8")
    run = build_run(tiny_config(tmp_path, f"system.extra_data={extra}"))
    assert len(run.train_data) == len(base.train_data) + 2  # the held-out text in the file is dropped
    assert torch.equal(run.val_data.ids, base.val_data.ids)  # the held-out split is unchanged


def test_length_grouping_gives_narrower_batches_of_the_same_epoch(tmp_path):
    """train.length_grouping: each epoch still visits every text once, in batches of similar length."""
    run = build_run(tiny_config(tmp_path))
    widths = {}
    for group in (0, 2):
        tc = tiny_config(tmp_path, "train.batch_size=4", f"train.length_grouping={group}").train
        state, seen, width = TrainState(), [], 0
        for _ in range(len(run.train_data) // 4):
            batch = _next_indices(run, tc, state)
            seen += batch
            width += int(run.train_data.lengths[batch].max())
        assert len(set(seen)) == len(seen) == len(run.train_data) // 4 * 4 and state.epoch == 0
        widths[group] = width
    assert widths[2] < widths[0]


def test_packed_logits_and_dropped_rows(trained):
    model = load_pretrained(trained).model
    ids = torch.tensor([[103, 2009, 103, 0], [2009, 103, 103, 103]])
    z = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    full = model(ids, cond=z)  # [2, 4, V]
    where = ids == 103
    torch.testing.assert_close(model(ids, cond=z, logits_at=where), full[where])
    torch.testing.assert_close(model(ids, cond=z, cond_drop=torch.tensor([True, True])), model(ids))
    assert torch.allclose(model.mask_fraction(ids), torch.tensor([2 / 3, 3 / 4]))


def test_cfg_zero_is_the_conditional_model(trained):
    pre = load_pretrained(trained)
    z = torch.nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(1)), dim=-1)
    lengths = torch.tensor([5, 3, 4])
    got = decode_vectors(pre, z, cfg_scale=0.0, lengths=lengths)
    fill = torch.arange(5)[None] < lengths[:, None]
    ids = torch.zeros(3, 5, dtype=torch.long)
    cfg = SampleConfig(gen_length=5, steps=2, reveal_schedule="cosine", suppress_tokens=[0, 100, 101, 102])
    plain = infill(pre.model, ids, fill, cfg, attention_mask=fill.long(), model_kwargs={"cond": z})
    assert got == [row[:n].tolist() for row, n in zip(plain.tokens, lengths.tolist(), strict=True)]
    with pytest.raises(DifflmError, match="CFG scale must be >= 0"):
        decode_vectors(pre, z, cfg_scale=-1.0, lengths=lengths)


def test_phase2_starts_from_phase1_weights(trained, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"source": a, "target": b}) + "\n"
            for a, b in zip(SENTENCES[:-1], SENTENCES[1:], strict=True)
        )
    )
    extra = [
        "model.encoder.vib=true",
        "model.encoder.vib_dim=16",
        f"system.init_from={trained}",
        f"data.path={pairs}",
    ]
    cfg = tiny_config(tmp_path, *extra, recipe="sgdd_phase2")
    run = build_run(cfg)
    assert len(run.train_data) == 2 * (len(SENTENCES) - 1 - 4)  # both directions, 4 held out
    phase1 = load_file(str(trained / "checkpoints/step-3/model.safetensors"))
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in phase1.items())


def test_bad_inputs(trained, tmp_path):
    pre = load_pretrained(trained)
    with pytest.raises(DifflmError, match="empty text"):
        sample_sgdd(pre, sample_args(text=["fine", "  "]))
    with pytest.raises(DifflmError, match="no text given"):
        sample_sgdd(pre, sample_args())
    with pytest.warns(UserWarning, match="longer than max_token_length=16 tokens and were truncated"):
        ids, lengths = tokenize_targets(pre.tokenizer, [" ".join(["word"] * 40), "short"], 16)
    assert lengths.tolist() == [16, 1] and ids.shape == (2, 16)
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DifflmError, match="is not an encoder"):
        build_run(tiny_config(tmp_path, f"model.encoder.name_or_path={tmp_path / 'gpt2'}"))


def test_pca_projection_keeps_the_main_axis():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(200, 3, generator=g) * torch.tensor([5.0, 0.1, 0.1])  # variance on axis 0
    out = project_table(table, 2, "encoder_pca")
    assert out.shape == (200, 2) and abs(out.std().item() - 0.02) < 1e-6
    corr = torch.corrcoef(torch.stack([out[:, 0], table[:, 0]]))[0, 1].abs()
    assert corr > 0.999  # the first output column is the dominant input axis (up to sign)
    wide = project_table(table, 5, "encoder_pca", g)  # wider than the table: noise columns appended
    assert wide.shape == (200, 5)
