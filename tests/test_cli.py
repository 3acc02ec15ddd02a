"""The CLI end to end on tiny checkpoints: sample, eval, and one-line errors with exit 2."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflm.cli import main
from tests.test_trainer import tiny_overrides


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    for recipe, out in (("shakespeare_char", "diff"), ("shakespeare_char_ar", "ar")):
        assert main(["train", recipe, *tiny_overrides(tmp, out, "train.max_steps=3", "data.block_size=32")]) == 0
    return tmp


def test_sample_diffusion_json_and_animation(checkpoints, capsys):
    gif = checkpoints / "s.gif"
    code = main(["sample", str(checkpoints / "diff"), "--prompt", "the king", "--prompt", "a",
                 "--gen-length", "8", "--steps", "4", "--batch-size", "2", "--json", "--animate", str(gif)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["prompt"] for row in lines[:-1]] == ["the king", "the king", "a", "a"]
    run = lines[-1]["run"]  # the run's own figures close the JSON output
    assert run["tokens"] == 4 * 8 and run["forward_passes"] == 4
    assert run["tokens_per_second"] == pytest.approx(run["tokens"] / run["seconds"], rel=1e-2)
    with Image.open(gif) as image:
        assert image.n_frames >= 4


def test_sample_autoregressive(checkpoints, capsys):
    assert main(["sample", str(checkpoints / "ar"), "--prompt", "the", "--gen-length", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["prompt"] == "the" and len(row["completion"]) <= 6


def test_eval_reports_finite_metrics(checkpoints, capsys):
    assert main(["eval", str(checkpoints / "diff"), "--samples", "2", "--max-batches", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["task"] == "masked_diffusion" and 1.0 < metrics["val_ppl_bound"] < 1e4
    assert main(["eval", str(checkpoints / "ar"), "--max-batches", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["task"] == "autoregressive" and metrics["val_loss"] > 0


def test_eval_left_to_right_and_any_order_are_exact_so_the_seed_does_not_move_them(checkpoints, capsys):
    runs = []
    for seed in ("0", "1"):
        argv = ["eval", str(checkpoints / "diff"), "--max-batches", "1", "--block-length", "4", "--seed", seed]
        assert main([*argv, "--left-to-right", "--any-order", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert runs[0]["val_left_to_right_nll"] == runs[1]["val_left_to_right_nll"] > 0
    assert runs[0]["val_any_order_nll"] == runs[1]["val_any_order_nll"] > 0
    assert runs[0]["val_elbo_nll"] != runs[1]["val_elbo_nll"]  # the bound is a Monte-Carlo estimate


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--steps", "0"], "steps=0 (reveal until each block is filled) needs sample.threshold"),
        (["--gen-length", "40"], "exceeds the model's max length 32"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--threshold", "0"], "threshold must be in (0, 1]"),
        (["--cfg-scale", "-2"], "cfg_scale must be >= 0"),
    ],
)
def test_bad_sampling_input_exits_2_with_one_line(checkpoints, capsys, extra, message):
    code = main(["sample", str(checkpoints / "diff"), "--prompt", "the", "--gen-length", "8", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_any_order_needs_short_blocks_and_says_so_before_the_bound(checkpoints, capsys):
    assert main(["eval", str(checkpoints / "diff"), "--any-order"]) == 2  # full-sequence: no blocks
    captured = capsys.readouterr()
    assert "needs blocks of 1..8 tokens" in captured.err and "it/s" not in captured.err  # no bound pass ran


def test_int8_is_for_sgdd_checkpoints(checkpoints, capsys):
    assert main(["eval", str(checkpoints / "diff"), "--int8"]) == 2
    assert "--int8 are for SGDD checkpoints" in capsys.readouterr().err
    assert main(["eval", str(checkpoints / "diff"), "--int8", "--precision", "bf16"]) == 2
    assert "--int8 decodes with float32 activations" in capsys.readouterr().err


def test_sample_threshold_without_steps(checkpoints, capsys):
    """--steps 0 --threshold: Fast-dLLM's rule, each block runs until filled (<= 8 passes here)."""
    args = ["sample", str(checkpoints / "diff"), "--prompt", "the", "--gen-length", "8", "--steps", "0"]
    assert main([*args, "--threshold", "0.5", "--block-length", "4"]) == 0
    assert "the" in capsys.readouterr().out


def test_missing_checkpoint_and_prompt(checkpoints, capsys):
    assert main(["sample", str(checkpoints / "nope"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sample", str(checkpoints / "diff")]) == 2
    assert "no prompt given" in capsys.readouterr().err


def test_export_writes_a_bf16_copy_that_samples_and_evaluates_alike(checkpoints, capsys):
    from safetensors import safe_open

    from difflm.pretrained import load_pretrained

    out = checkpoints / "exported"
    assert main(["export", str(checkpoints / "diff"), str(out)]) == 0
    assert not (out / "optimizer.safetensors").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    source, copy = load_pretrained(checkpoints / "diff"), load_pretrained(out)
    for (name, a), (_, b) in zip(source.model.state_dict().items(), copy.model.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16).float(), b.float()), name  # the copy is the rounded source
    assert main(["export", str(checkpoints / "diff"), str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_export_with_data_evaluates_the_copy_on_that_source(checkpoints, tmp_path, capsys):
    """--data points the copy's eval at another file (a run trained on text that is not shared)."""
    from difflm.pretrained import load_pretrained

    other = tmp_path / "other.txt"
    other.write_text(Path(load_pretrained(checkpoints / "diff").config.data.path).read_text()[::-1])
    out = tmp_path / "exported"
    assert main(["export", str(checkpoints / "diff"), str(out), "--data", str(other)]) == 0
    assert load_pretrained(out).config.data.path == str(other)
    capsys.readouterr()
    evals = []
    for folder in (checkpoints / "diff", out):
        assert main(["eval", str(folder), "--json", "--max-batches", "1"]) == 0
        evals.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_elbo_nll"])
    assert evals[0] != evals[1]  # scored on other text


def test_export_of_several_checkpoints_is_the_mean_of_their_weights(checkpoints, capsys):
    """A model soup: `export A B OUT` writes the average of A's and B's weights, A's config."""
    from difflm.pretrained import load_pretrained

    seed2 = ("train.max_steps=3", "data.block_size=32", "train.seed=2")
    assert main(["train", "shakespeare_char", *tiny_overrides(checkpoints, "diff_seed2", *seed2)]) == 0
    first, second, out = checkpoints / "diff", checkpoints / "diff_seed2", checkpoints / "soup"
    assert main(["export", str(first), str(second), str(out), "--dtype", "fp32"]) == 0
    assert "the average of 2 checkpoints" in capsys.readouterr().out
    a, b, mean = (load_pretrained(p).model.state_dict() for p in (first, second, out))
    assert any(not torch.equal(a[name], b[name]) for name in a)  # two different models
    for name in a:
        assert torch.equal(mean[name], ((a[name].double() + b[name].double()) / 2).float()), name
    assert load_pretrained(out).config == load_pretrained(first).config
    assert main(["export", str(first), str(first), str(checkpoints / "same"), "--dtype", "fp32"]) == 0
    same = load_pretrained(checkpoints / "same").model.state_dict()
    assert all(torch.equal(same[name], a[name]) for name in a)  # the soup of one model is that model


def test_a_soup_refuses_checkpoints_of_different_tasks_or_models(checkpoints, capsys):
    import dataclasses

    from difflm.errors import DifflmError
    from difflm.pretrained import load_pretrained
    from difflm.soup import soup

    mixed = checkpoints / "mixed"
    assert main(["export", str(checkpoints / "diff"), str(checkpoints / "ar"), str(mixed)]) == 2
    err = capsys.readouterr().err.strip()
    assert "average checkpoints of one task" in err and len(err.splitlines()) == 1
    assert not mixed.exists()
    pre = load_pretrained(checkpoints / "diff")
    other = dataclasses.replace(pre.config, model=dataclasses.replace(pre.config.model, n_layer=3))
    with pytest.raises(DifflmError, match="model.n_layer=3"):
        soup([load_pretrained(checkpoints / "diff"), dataclasses.replace(pre, config=other)])
