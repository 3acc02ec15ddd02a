"""Runs never destroy work: re-training into a run folder, pruning, killed saves, stop signals, the
log after a resume; and the guards around loading (old manifests, size estimate, offline hub)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from torch import nn

from difflm.cli import main
from difflm.config import TrainConfig, config_from_dict, load_config
from difflm.errors import DifflmError
from difflm.models import BUILDERS, MODEL_CONFIGS
from difflm.models.size import check_fits, estimate_params
from difflm.pretrained import load_pretrained, offline_hub
from difflm.systems.registry import build_run
from difflm.train import checkpoint as ckpt
from difflm.train.run_folder import TrainingInterrupted, claim_output_dir
from difflm.train.trainer import train
from tests.test_trainer import tiny_overrides

RECIPE = "recipes/shakespeare_char.yaml"


def steps_in(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").glob("step-*")), key=lambda n: int(n[5:]))


def logged_steps(run: Path) -> list[int]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def test_retraining_into_a_run_folder_keeps_both_runs(tmp_path, capsys):
    first = tiny_overrides(tmp_path, "R", "train.max_steps=8", "train.save_every=2", "train.keep_last=2")
    assert main(["train", "shakespeare_char", *first]) == 0
    assert steps_in(tmp_path / "R") == ["step-6", "step-8"]
    second = tiny_overrides(tmp_path, "R", "train.max_steps=4", "train.save_every=1", "train.keep_last=2")
    capsys.readouterr()
    assert main(["train", "shakespeare_char", *second]) == 2  # refused: nothing touched
    assert "already holds a run" in capsys.readouterr().err
    assert steps_in(tmp_path / "R") == ["step-6", "step-8"]

    assert main(["train", "shakespeare_char", *second, "train.overwrite=true"]) == 0
    [aside] = tmp_path.glob("R.old-*")
    assert steps_in(aside) == ["step-6", "step-8"] and logged_steps(aside) == list(range(1, 9))
    assert steps_in(tmp_path / "R") == ["step-3", "step-4"] and logged_steps(tmp_path / "R") == [1, 2, 3, 4]
    assert load_pretrained(tmp_path / "R").path.name == "step-4"
    assert load_pretrained(aside).path.name == "step-8"


def tiny_save(root: Path, step: int, keep_last: int = 0) -> Path:
    model = nn.Linear(2, 2)
    return ckpt.save_checkpoint(root, step, model=model, run_config={}, trainer_state={}, keep_last=keep_last)


def test_pruning_removes_only_this_runs_older_checkpoints(tmp_path):
    for step in (10, 20):
        tiny_save(tmp_path, step)
    for step in (1, 2, 3):
        tiny_save(tmp_path, step, keep_last=2)
    assert steps_in(tmp_path) == ["step-2", "step-3", "step-10", "step-20"]
    assert ckpt.read_latest(ckpt.checkpoints_dir(tmp_path)) == "step-3"


def test_leftovers_of_killed_saves_and_prunes_are_cleaned(tmp_path):
    root = ckpt.checkpoints_dir(tmp_path)
    tiny_save(tmp_path, 1)
    for name in (".trash-step-0", ".old-step-1", ".tmp-step-2-999"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"x" * 100)
    tiny_save(tmp_path, 2)  # a save finishes the half-done prune and swap, not another run's temp
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".tmp-step-2-999"]
    claim_output_dir(TrainConfig(output_dir=str(tmp_path), resume="latest"), is_writer=True)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # a new start removes stale temps


def test_resume_logs_each_step_once_and_matches(tmp_path):
    full = load_config(RECIPE, tiny_overrides(tmp_path, "R", "train.max_steps=6", "train.save_every=3"))
    train(full, build_run(full))
    before = (tmp_path / "R/log.jsonl").read_text().splitlines()
    again = load_config(
        RECIPE,
        tiny_overrides(tmp_path, "R", "train.max_steps=6", "train.save_every=3", "train.resume=step-3"),
    )
    train(again, build_run(again))
    after = (tmp_path / "R/log.jsonl").read_text().splitlines()
    assert logged_steps(tmp_path / "R") == [1, 2, 3, 4, 5, 6]
    assert [json.loads(x)["loss"] for x in after if '"loss"' in x] == [
        json.loads(x)["loss"] for x in before if '"loss"' in x
    ]  # the replayed steps are bit-identical, and logged once
    wall = [json.loads(x)["wall_s"] for x in after if '"loss"' in x]
    saved = json.loads((tmp_path / "R/checkpoints/step-3/trainer_state.json").read_text())["wall_seconds"]
    assert saved == wall[2] and wall == sorted(wall) and wall[3] > wall[2] > 0  # goes on from the checkpoint's


class SignalAtStep:
    """A task wrapper that sends this process `sig` during the loss of step `at` (0-based)."""

    def __init__(self, task, at: int, sig: int) -> None:
        self.task, self.at, self.sig, self.calls = task, at, sig, 0

    def prepare(self, batch, generator):
        return self.task.prepare(batch, generator)

    def loss(self, model, batch):
        if self.calls == self.at:
            signal.raise_signal(self.sig)
        self.calls += 1
        return self.task.loss(model, batch)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_a_final_checkpoint(tmp_path, sig):
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "R", "train.max_steps=50", "train.save_every=0"))
    run = build_run(cfg)
    run.objective = SignalAtStep(run.objective, at=2, sig=sig)
    before = signal.getsignal(sig)  # SIG_IGN when the suite runs as a background job
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(sig).name} after step 3"):
        train(cfg, run)
    assert steps_in(tmp_path / "R") == ["step-3"] and logged_steps(tmp_path / "R") == [1, 2, 3]
    assert signal.getsignal(sig) is before  # handlers restored


def test_format_1_manifest_still_loads(tmp_path):
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "R", "train.max_steps=1"))
    train(cfg, build_run(cfg))
    step = ckpt.resolve_checkpoint(tmp_path / "R")
    files = {p.name: p.stat().st_size for p in step.iterdir() if p.name != ckpt.MANIFEST_FILE}
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps({"files": files}))  # sizes only, no tied names
    model = load_pretrained(step).model
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize(
    ("family", "fields"),
    [
        ("transformer", dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mask_token_id=63)),
        (
            "transformer",
            dict(vocab_size=50000, block_size=256, n_layer=4, n_head=4, n_embd=256, mlp="swiglu"),
        ),
        ("dfgpt", dict(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=48)),
        (
            "qwen3_llada",
            dict(
                vocab_size=300,
                mask_token_id=299,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            ),
        ),
    ],
)
def test_size_estimate_bounds_the_real_count(family, fields):
    cfg = MODEL_CONFIGS[family](**fields)
    real = sum(p.numel() for p in BUILDERS[family](cfg).parameters())
    assert real <= estimate_params(family, cfg) <= 2 * real


def test_a_model_too_large_is_refused_before_allocation():
    cfg = MODEL_CONFIGS["transformer"](vocab_size=64, block_size=16, n_layer=10**9, n_embd=384)
    with pytest.raises(DifflmError, match=r"about 2.36e\+15 parameters \(9.44e\+06 GB of float32"):
        check_fits("transformer", cfg)
    check_fits("transformer", MODEL_CONFIGS["transformer"](vocab_size=64, block_size=16), available=10**9)


def test_checkpoint_loads_are_offline(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with offline_hub():
        assert hub.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


def test_hub_name_inside_a_checkpoint_never_reaches_the_network(tmp_path, monkeypatch):
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "R", "train.max_steps=1"))
    train(cfg, build_run(cfg))
    step = ckpt.resolve_checkpoint(tmp_path / "R")
    data = json.loads((step / ckpt.RUN_CONFIG_FILE).read_text())
    data["model"] = {"family": "mlm", "name_or_path": "bert-base-uncased", "mask_token_id": 0}
    (step / ckpt.RUN_CONFIG_FILE).write_text(json.dumps(data))
    tied = json.loads((step / ckpt.MANIFEST_FILE).read_text())["tied"]
    ckpt._write_manifest(step, tied)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a checkpoint load reached the network")

    import socket

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DifflmError, match="bert-base-uncased"):
        load_pretrained(step)


def test_tied_weights_are_declared_in_the_manifest(tmp_path):
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "R", "train.max_steps=1"))
    train(cfg, build_run(cfg))
    step = ckpt.resolve_checkpoint(tmp_path / "R")
    manifest = json.loads((step / ckpt.MANIFEST_FILE).read_text())
    assert manifest["format"] == 2 and manifest["tied"] == {"lm_head.weight": "tok_emb.weight"}  # the head is stored as the embedding
    assert manifest["files"]["model.safetensors"]["sha256"] == ckpt.file_sha256(step / "model.safetensors")
    manifest["tied"] = {"blocks.0.attn.qkv.weight": "tok_emb.weight", **manifest["tied"]}
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    model = BUILDERS["transformer"](config_from_dict(ckpt.read_json(step / ckpt.RUN_CONFIG_FILE)).model)
    with pytest.raises(DifflmError, match="declare 'blocks.0.attn.qkv.weight' tied"):
        ckpt.load_weights(model, step)
