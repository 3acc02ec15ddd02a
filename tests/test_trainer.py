"""The one trainer: exact resume across processes, DDP parity, atomic checkpoints, clear errors."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from difflm.config import load_config
from difflm.errors import DifflmError
from difflm.pretrained import load_pretrained
from difflm.sampling.unmask import SampleConfig, generate
from difflm.systems.registry import build_run
from difflm.train import checkpoint as ckpt
from difflm.train.trainer import train

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.dropout=0.0",
    "data.block_size=16",
    "train.batch_size=8",
    "train.warmup_steps=3",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.progress=false",
    "train.device=cpu",
]


def make_corpus(path: Path, n_words: int = 3000) -> Path:
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "night", "crown", "speak", "love", "death", "fair"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)) + "\n", encoding="utf-8")
    return path


def tiny_overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    corpus = make_corpus(tmp_path / "corpus.txt")
    return [
        *TINY,
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / out}",
        *extra,
    ]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difflm.cli", *args], capture_output=True, text=True, timeout=300
    )


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_resume_after_kill_is_bit_identical(tmp_path):
    recipe = "shakespeare_char"
    full = run_cli(
        ["train", recipe, *tiny_overrides(tmp_path, "full", "train.max_steps=20", "train.save_every=10")]
    )
    assert full.returncode == 0, full.stderr
    part = run_cli(
        [
            "train",
            recipe,
            *tiny_overrides(
                tmp_path, "part", "train.max_steps=20", "train.save_every=10", "train.stop_at_step=10"
            ),
        ]
    )
    assert part.returncode == 0, part.stderr
    assert (tmp_path / "part/checkpoints/latest").read_text().strip() == "step-10"
    resumed = run_cli(
        [
            "train",
            recipe,
            *tiny_overrides(
                tmp_path, "part", "train.max_steps=20", "train.save_every=10", "train.resume=latest"
            ),
        ]
    )
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(str(tmp_path / "full/checkpoints/step-20/model.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoints/step-20/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # 20 losses, bit-identical
    opt_a = load_file(str(tmp_path / "full/checkpoints/step-20/optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "part/checkpoints/step-20/optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(
        "recipes/shakespeare_char.yaml",
        tiny_overrides(tmp_path, "run", "train.max_steps=4", "train.save_every=2"),
    )
    train(cfg, build_run(cfg))
    good = ckpt.resolve_checkpoint("latest", cfg.train.output_dir)
    before = (good / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_manifest", explode)
    cfg2 = load_config(
        "recipes/shakespeare_char.yaml",
        tiny_overrides(tmp_path, "run", "train.max_steps=6", "train.save_every=2", "train.resume=latest"),
    )
    with pytest.raises(OSError):
        train(cfg2, build_run(cfg2))
    assert ckpt.resolve_checkpoint("latest", cfg.train.output_dir) == good
    assert (good / "model.safetensors").read_bytes() == before


def test_truncated_and_missing_checkpoints_are_refused(tmp_path):
    cfg = load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "run", "train.max_steps=2"))
    train(cfg, build_run(cfg))
    path = ckpt.resolve_checkpoint("latest", cfg.train.output_dir)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DifflmError, match="truncated or corrupt"):
        ckpt.resolve_checkpoint("latest", cfg.train.output_dir)
    with pytest.raises(DifflmError, match="not found"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(DifflmError, match="no checkpoint to resume"):
        ckpt.resolve_checkpoint("latest", tmp_path / "empty")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    cfg = load_config("recipes/shakespeare_char.yaml", overrides)
    train(cfg, build_run(cfg))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    extra = ("train.max_steps=4", "train.save_every=4")
    one = load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "one", *extra))
    train(one, build_run(one))
    two = tiny_overrides(tmp_path, "two", *extra)
    mp.spawn(_ddp_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    a = load_file(str(tmp_path / "one/checkpoints/step-4/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step-4/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    base = load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "a", "train.max_steps=3"))
    train(base, build_run(base))
    accum = load_config(
        "recipes/shakespeare_char.yaml",
        tiny_overrides(tmp_path, "b", "train.max_steps=3", "train.grad_accum=4"),
    )
    train(accum, build_run(accum))
    a = load_file(str(tmp_path / "a/checkpoints/step-3/model.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-3/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path=/nonexistent/corpus.txt"], "not found"),
        (["data.block_size=100000"], "larger than the train split"),
        (["train.resume=latest"], "no checkpoint to resume"),
        (["train.length_grouping=4"], "needs per-item lengths"),  # packed text windows have none
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    result = run_cli(
        ["train", "shakespeare_char", *tiny_overrides(tmp_path, "bad", "train.max_steps=2"), *overrides]
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_and_non_utf8_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    for path, message in ((empty, "no text"), (latin, "UTF-8")):
        result = run_cli(["train", "shakespeare_char", *tiny_overrides(tmp_path, "bad", f"data.path={path}")])
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_recipe_is_a_clear_error():
    result = run_cli(["train", "no_such_recipe"])
    assert result.returncode == 2 and "unknown recipe 'no_such_recipe'" in result.stderr


def test_lookahead_rows_train_save_load_and_sample(tmp_path):
    shifted = ("diffusion.block_length=4", "model.logits_shift=1", "model.lookahead_row=true")
    cfg = load_config(
        "recipes/shakespeare_char.yaml",
        tiny_overrides(tmp_path, "la", "train.max_steps=2", "train.save_every=0", *shifted),
    )
    train(cfg, build_run(cfg))
    pre = load_pretrained(str(tmp_path / "la"))
    assert pre.model.lookahead_row and pre.config.diffusion.block_length == 4
    prompt = torch.tensor([pre.tokenizer.encode("the ")])
    base = dict(gen_length=8, steps=8, block_length=4, block_causal=True)
    with torch.no_grad():
        plain = generate(pre.model, prompt, SampleConfig(**base))
        cached = generate(pre.model, prompt, SampleConfig(**base, cache="prefix"))
    assert torch.equal(plain.tokens, cached.tokens)


def test_lookahead_rows_need_block_diffusion(tmp_path):
    overrides = tiny_overrides(tmp_path, "x", "model.logits_shift=1", "model.lookahead_row=true")
    with pytest.raises(DifflmError, match="diffusion.block_length"):
        build_run(load_config("recipes/shakespeare_char.yaml", overrides))
    with pytest.raises(DifflmError, match="logits_shift=1"):
        build_run(load_config("recipes/shakespeare_char.yaml", [*overrides[:-2], "model.lookahead_row=true"]))


def test_save_every_zero_saves_only_at_the_end(tmp_path):
    cfg = load_config(
        "recipes/shakespeare_char.yaml",
        tiny_overrides(tmp_path, "r", "train.max_steps=3", "train.save_every=0"),
    )
    train(cfg, build_run(cfg))
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == ["latest", "step-3"]


# ----------------------------------------------------------------------------- fp16 loss scaling


class TinyGradientObjective:
    """loss = 1e-8 * sum of a Linear's outputs: under fp16 autocast its gradient (1e-8) underflows."""

    def prepare(self, batch, generator):
        return batch

    def loss(self, model, batch):
        return 1e-8 * model(batch["input_ids"].float()).float().sum(), {}


def test_fp16_scales_the_loss_so_small_gradients_survive(tmp_path):
    from difflm.train.trainer import Run

    extra = ("train.max_steps=1", "train.batch_size=4", "train.precision=fp16", "train.weight_decay=0")
    cfg = load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "fp16", *extra))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    data = [torch.arange(4) + i for i in range(8)]
    state = train(cfg, Run(model, TinyGradientObjective(), data, data))
    assert not torch.equal(model.weight.detach(), before)  # without a loss scale: gradient 0, no move
    assert state.grad_scaler["scale"] == 65536.0 and state.grad_scaler["_growth_tracker"] == 1


def test_fp16_resume_restores_the_loss_scale_exactly(tmp_path):
    extra = ("train.max_steps=6", "train.save_every=3", "train.precision=fp16")
    full = load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "full", *extra))
    train(full, build_run(full))
    part = load_config(
        "recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "part", *extra, "train.stop_at_step=3")
    )
    train(part, build_run(part))
    again = load_config(
        "recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, "part", *extra, "train.resume=latest")
    )
    train(again, build_run(again))
    a, b = (
        json.loads((tmp_path / f"{r}/checkpoints/step-6/trainer_state.json").read_text())
        for r in ("full", "part")
    )
    assert a["grad_scaler"] == b["grad_scaler"] and a["grad_scaler"]["_growth_tracker"] == 6
    wa = load_file(str(tmp_path / "full/checkpoints/step-6/model.safetensors"))
    wb = load_file(str(tmp_path / "part/checkpoints/step-6/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
