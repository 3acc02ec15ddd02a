"""`data.extra_train`: more text for training only, beside a corpus whose validation split and
tokenizer stay its own."""

import json
import math

import pytest
import torch

from difflm.cli import main
from difflm.config import load_config
from difflm.errors import DifflmError
from difflm.systems.registry import build_run
from difflm.train.trainer import train
from tests.qwen3_llada_fixtures import sft_overrides
from tests.test_trainer import tiny_overrides

EXTRA = "the fair queen and the king speak of love " * 20  # only characters of the corpus


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def config(tmp_path, out, *extra):
    return load_config("recipes/shakespeare_char.yaml", tiny_overrides(tmp_path, out, *extra))


def test_extra_text_is_appended_to_training_blocks_and_nothing_else(tmp_path):
    extra = write(tmp_path / "extra.txt", EXTRA)
    base = build_run(config(tmp_path, "a"))
    run = build_run(config(tmp_path, "b", f"data.extra_train=[{extra}]"))
    assert run.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    assert [b.tolist() for b in run.val_data] == [b.tolist() for b in base.val_data]
    n_base, block = len(base.train_data), 16
    assert len(run.train_data) == n_base + len(EXTRA) // block
    assert all(torch.equal(run.train_data[i], base.train_data[i]) for i in range(n_base))
    appended = "".join(run.tokenizer.decode(b.tolist()) for b in run.train_data.datasets[1])
    assert appended == EXTRA[: len(EXTRA) // block * block]  # whole blocks of the extra text, in order


def test_training_with_extra_text_records_it_and_evaluates_on_the_corpus(tmp_path, capsys):
    extra = write(tmp_path / "extra.txt", EXTRA)
    cfg = config(tmp_path, "run", f"data.extra_train=[{extra}]", "train.max_steps=2")
    train(cfg, build_run(cfg))
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "difflm.json").read_text())
    assert saved["data"]["extra_train"] == [str(extra)]
    extra.unlink()  # evaluation reads the corpus's validation split alone
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out.splitlines()[-1])["val_elbo_nll"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("the queen & the king " * 20, r"extra.txt: character '&'.*\(the tokenizer is data.path's"),
        ("king", r"data.extra_train .*extra.txt has 4 tokens, not one block of data.block_size 16"),
    ],
)
def test_extra_text_the_corpus_cannot_take_is_refused_by_name(tmp_path, text, message):
    extra = write(tmp_path / "extra.txt", text)
    cfg = config(tmp_path, "run", f"data.extra_train=[{extra}]")
    with pytest.raises(DifflmError, match=message):
        build_run(cfg)


def test_extra_train_must_be_a_list_of_existing_paths(tmp_path):
    with pytest.raises(DifflmError, match="data.extra_train must be a list of paths"):
        config(tmp_path, "run", "data.extra_train=[1]")
    cfg = config(tmp_path, "run", "data.extra_train=[nope.txt]")
    with pytest.raises(DifflmError, match="data.extra_train nope.txt: data file nope.txt not found"):
        build_run(cfg)


def test_a_task_without_packed_text_refuses_extra_text(tmp_path):
    extra = write(tmp_path / "extra.txt", EXTRA)
    cfg = load_config(None, sft_overrides(tmp_path, "sft", f"data.extra_train=[{extra}]"))
    with pytest.raises(DifflmError, match="sft does not train on packed text: drop data.extra_train"):
        build_run(cfg)
