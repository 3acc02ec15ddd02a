"""The system registry: one `System` per task, each trainable, evaluable and samplable, and
`difflm systems` listing them."""

import json
import math

import pytest

from difflm.cli import main
from difflm.config import load_config
from difflm.errors import DifflmError
from difflm.systems.registry import SYSTEMS, build_run, get_system, resolve
from difflm.train.trainer import train
from tests.qwen3_llada_fixtures import sft_overrides


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_every_system_trains_evaluates_and_samples(name):
    system = SYSTEMS[name]
    assert system.name == name and system.description
    assert system.abilities() == ["train", "eval", "sample"]
    for ref in (system.build, system.evaluate, system.sample, system.sample_texts):
        assert ref is None or callable(resolve(ref)), ref


def test_unknown_task_names_the_choices():
    with pytest.raises(DifflmError, match="valid choices: masked_diffusion"):
        get_system("nope")


def test_systems_command_lists_every_task(capsys):
    assert main(["systems", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["task"] for row in rows] == list(SYSTEMS)
    assert all(row["can"] == ["train", "eval", "sample"] for row in rows)
    assert main(["systems"]) == 0
    assert "qwen3_llada_sft" in capsys.readouterr().out


def test_sft_checkpoint_evaluates_on_held_out_conversations(tmp_path, capsys):
    cfg = load_config(None, sft_overrides(tmp_path, "sft", "train.max_steps=2"))
    train(cfg, build_run(cfg))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sft"), "--json", "--batch-size", "2", "--max-batches", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == "qwen3_llada_sft" and math.isfinite(metrics["val_loss"])
