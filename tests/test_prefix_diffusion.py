"""prefix_diffusion / poems_ar systems: masking invariants, the loss, the mlm family, CLI paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel

from difflm.cli import main
from difflm.config import load_config
from difflm.data.tokenizers import CharTokenizer
from difflm.errors import DifflmError
from difflm.pretrained import load_pretrained
from difflm.systems.prefix_diffusion import PrefixDiffusionConfig, PrefixDiffusionObjective
from difflm.systems.registry import build_run
from difflm.train.trainer import split_batch, train

LINES = ["春风吹过山岗", "夜里的河流", "我们在灯下读信", "雪落在远方", "大海是蓝色的梦", "一只鸟飞过屋顶"]
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.dropout=0.0",
    "data.block_size=24",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.progress=false",
    "train.device=cpu",
    "system.prefix_len=4",
]


def poem_file(path: Path, n: int = 30, broken: bool = False) -> Path:
    rows = []
    for i in range(n):
        content = "\n\n".join(LINES[(i + k) % len(LINES)] for k in range(3)) + f"\n\n第{i}首"
        rows.append(json.dumps({"title": f"t{i}", "author": "a", "content": content}, ensure_ascii=False))
    if broken:
        rows += ['{"title": "x", "author": "y"}', "{not json"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("poems")
    assert (
        main(["data", "build-poems", str(poem_file(root / "p.jsonl", broken=True)), str(root / "split")]) == 0
    )
    return root / "split"


def task_and_batch(rates: list[float], noise: str = "discrete", loss: str = "mean"):
    tok = CharTokenizer.from_texts(LINES)
    cfg = load_config("recipes/poems_prefix_diffusion.yaml", ["data.block_size=12", f"system.noise={noise}"])
    scfg = PrefixDiffusionConfig(prefix_len=3, rates=rates, noise=noise, loss=loss)
    lengths = [12, 9, 5, 3]
    ids = torch.full((4, 12), tok.pad_token_id)
    for r, n in enumerate(lengths):
        row = (tok.encode("".join(LINES)) * 2)[: n - 1] + [tok.eos_token_id]
        ids[r, :n] = torch.tensor(row)
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    return tok, PrefixDiffusionObjective(cfg, scfg, tok), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("noise", ["discrete", "elbo"])
def test_never_masks_prefix_special_or_padding(noise: str) -> None:
    tok, task, batch = task_and_batch([1.0], noise)
    allowed = (
        (torch.arange(12) >= 3) & batch["attention_mask"].bool() & (batch["input_ids"] != tok.eos_token_id)
    )
    for seed in range(5):
        out = task.prepare(batch, torch.Generator().manual_seed(seed))
        assert not (out["noised"] & ~allowed).any()
        assert torch.equal(out["input_ids"], batch["input_ids"])
        assert (out["noisy"][out["noised"]] == tok.mask_token_id).all()
    if noise == "discrete":  # rate 1.0 masks exactly every allowed position
        assert torch.equal(out["noised"], allowed)


def test_discrete_mask_rate_matches_p() -> None:
    tok, task, batch = task_and_batch([0.3])
    big = {k: v.repeat(200, 1) for k, v in batch.items()}
    allowed = (torch.arange(12) >= 3) & big["attention_mask"].bool() & (big["input_ids"] != tok.eos_token_id)
    out = task.prepare(big, torch.Generator().manual_seed(0))
    rate = out["noised"].sum().item() / allowed.sum().item()
    assert abs(rate - 0.3) < 0.03  # 2,800 Bernoulli(0.3) draws: std 0.009
    assert out["rate"].eq(0.3).all()


@pytest.mark.parametrize("kind", ["mean", "elbo"])
def test_loss_matches_hand_computation_and_micro_batches(kind: str) -> None:
    tok, task, batch = task_and_batch([0.5], loss=kind)
    out = task.prepare(batch, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    table = torch.randn(tok.vocab_size, tok.vocab_size)

    def model(x, attention_bias=None):
        return table[x]  # [B, L, V]

    loss, _ = task.loss(model, out)
    ce = F.cross_entropy(table[out["noisy"]][out["noised"]], out["input_ids"][out["noised"]], reduction="sum")
    expected = ce / out["noised"].sum() if kind == "mean" else ce / 0.5 / out["noised"].numel()
    torch.testing.assert_close(loss, expected)
    halves = [task.loss(model, split_batch(out, 2, i))[0] for i in range(2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss)


def test_prefix_not_shorter_than_max_length_is_an_error(tmp_path: Path, split_dir: Path) -> None:
    cfg = load_config(
        "recipes/poems_prefix_diffusion.yaml", [*TINY, f"data.path={split_dir}", "system.prefix_len=24"]
    )
    with pytest.raises(DifflmError, match="prefix_len 24 is not shorter than data.block_size 24"):
        build_run(cfg)


def test_build_poems_command_skips_bad_records(split_dir: Path, capsys) -> None:
    counts = json.loads((split_dir / "split.json").read_text())["counts"]
    assert counts["skipped_broken"] == 1 and counts["skipped_missing"] == 1 and counts["read"] == 30


def hf_base(folder: Path, kind: str) -> Path:
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LINES[0], *"abc"]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    size = dict(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    if kind == "bert":
        body = BertModel(BertConfig(**size, max_position_embeddings=32))
    else:
        body = RobertaModel(RobertaConfig(**size, max_position_embeddings=34, pad_token_id=0))
    body.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mlm_family_trains_and_reloads_without_base(tmp_path: Path, kind: str) -> None:
    base = hf_base(tmp_path / "base", kind)
    text = tmp_path / "text.txt"
    text.write_text((LINES[0] + "abc") * 200, encoding="utf-8")
    overrides = [
        "model.family=mlm",
        f"model.name_or_path={base}",
        f"data.path={text}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'run'}",
        *[o for o in TINY if not o.startswith("model.")],
    ]
    cfg = load_config("recipes/shakespeare_minilm_prefix.yaml", overrides)
    run = build_run(cfg)
    train(cfg, run)
    shutil.rmtree(base)  # the checkpoint must rebuild from its own hf_config
    pre = load_pretrained(tmp_path / "run")
    hf = pre.model.mlm
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    x = torch.tensor([pre.tokenizer.encode(LINES[0])])
    torch.testing.assert_close(pre.model(x), run.model.eval()(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, split_dir: Path) -> Path:
    """Two tiny checkpoints on the same split: prefix diffusion (`diff`) and its AR baseline (`ar`)."""
    root = tmp_path_factory.mktemp("runs")
    for recipe, out in (("poems_prefix_diffusion", "diff"), ("poems_ar", "ar")):
        args = [*TINY, f"data.path={split_dir}", f"train.output_dir={root / out}"]
        if recipe == "poems_ar":
            args = [a for a in args if not a.startswith("system.")]
        assert main(["train", f"recipes/{recipe}.yaml", *args]) == 0
    return root


def test_compare_writes_one_gif_with_equal_frames(tmp_path: Path, trained: Path) -> None:
    gif = tmp_path / "c.gif"
    cmd = ["compare", str(trained / "diff"), str(trained / "ar"), "--prompt", "春风吹过", "--gen-length", "8"]
    assert main([*cmd, "--steps", "4", "--out", str(gif)]) == 0
    with Image.open(gif) as img:
        sizes = set()
        for i in range(img.n_frames):
            img.seek(i)
            sizes.add(img.size)
        assert len(sizes) == 1 and img.n_frames > 8  # 8 AR steps + held frames
    assert main(["eval", str(trained / "diff"), "--max-batches", "1", "--batch-size", "2"]) == 0


@pytest.mark.slow
def test_poem_completion_benchmark_end_to_end(tmp_path: Path, trained: Path, split_dir: Path, capsys) -> None:
    bench = ["eval", "poem-completion", "--diffusion", str(trained / "diff"), "--ar", str(trained / "ar")]
    bench += ["--split-dir", str(split_dir), "--out-dir", str(tmp_path / "bench"), "--n-poems", "2"]
    assert main([*bench, "--ratios", "0.2,0.5", "--prefix-len", "4", "--candidates", "2"]) == 0
    rows = (tmp_path / "bench/results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 and (tmp_path / "bench/plot.png").is_file()
    external = ["--poems", str(poem_file(tmp_path / "mine.jsonl")), "--json", "--ratios", "0.3"]
    bench = [*bench[:6], "--out-dir", str(tmp_path / "mine"), "--n-poems", "2", "--prefix-len", "4"]
    capsys.readouterr()
    assert main([*bench, *external]) == 0
    found = json.loads(capsys.readouterr().out)["rows"]
    assert {r["method"] for r in found} == {"diffusion", "ar_left_to_right", "ar_rescored"}
    diffusion = next(r for r in found if r["method"] == "diffusion")
    low, high = diffusion["acc_ci95"]
    assert low <= diffusion["accuracy"] <= high and len(diffusion["minus_ar_ci95"]) == 2


def test_compare_takes_a_hugging_face_causal_lm(tmp_path: Path, trained: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = hf_base(tmp_path / "tok", "bert")  # any tokenizer folder will do for the AR side
    tok = BertTokenizerFast.from_pretrained(str(base))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=64)
    ).save_pretrained(str(tmp_path / "gpt2"))
    tok.save_pretrained(str(tmp_path / "gpt2"))
    gif = tmp_path / "hf.gif"
    cmd = ["compare", str(trained / "diff"), str(tmp_path / "gpt2"), "--prompt", "春风", "--gen-length", "6"]
    assert main([*cmd, "--steps", "3", "--out", str(gif)]) == 0
    assert gif.is_file()


@pytest.mark.parametrize("kind, limit", [("bert", 32), ("roberta", 33)])
def test_block_size_is_checked_against_the_real_position_limit(tmp_path: Path, kind: str, limit: int) -> None:
    """RoBERTa numbers positions from padding_idx + 1: 34 rows, pad 0 -> 33 tokens (34 passed, then crashed)."""
    base = hf_base(tmp_path / "base", kind)
    text = tmp_path / "text.txt"
    text.write_text((LINES[0] + "abc") * 200, encoding="utf-8")

    def config(block_size: int):
        overrides = [
            "model.family=mlm",
            f"model.name_or_path={base}",
            f"data.path={text}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'run'}",
            *[o for o in TINY if not o.startswith(("model.", "data.block_size"))],
            f"data.block_size={block_size}",
        ]
        return load_config("recipes/shakespeare_minilm_prefix.yaml", overrides)

    with pytest.raises(DifflmError, match=f"exceeds .* {limit} positions"):
        build_run(config(limit + 1))
    run = build_run(config(limit))
    assert run.model.max_length == limit
    ids = torch.full((1, limit + 1), 1)  # [UNK], not the pad id (it would shift RoBERTa's positions)
    assert run.model(ids[:, :limit]).shape == (1, limit, run.model.mlm.config.vocab_size)
    with pytest.raises((IndexError, RuntimeError)):  # one more token does not fit the position table
        run.model(ids)
