"""Teacher / Diffusion Forcing systems: training through train(), reload, exact resume, eval, sample, CLI errors."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from difflm.cli import main
from difflm.config import load_config
from difflm.evaluate.forcing import (
    ContinuationConfig,
    eval_forcing,
    held_out_windows,
    judge_nll,
)
from difflm.evaluate.options import EvalOptions
from difflm.models.dfgpt import DFGPT, DFGPTConfig
from difflm.pretrained import load_pretrained
from difflm.sampling.autoregressive import generate_ar
from difflm.systems.forcing import DiffusionForcingObjective
from difflm.systems.registry import build_run
from difflm.train.trainer import train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.dropout=0.0",
    "model.gaussian.timesteps=100",
    "model.gaussian.sampling_timesteps=4",
    "model.gaussian.stabilization_level=2",
    "data.block_size=16",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.progress=false",
    "train.device=cpu",
    "system.horizon=4",
]


def overrides(tmp: Path, out: str, *extra: str) -> list[str]:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        rng = random.Random(0)
        words = ["the", "king", "queen", "sword", "night", "crown", "speak", "love", "death", "fair"]
        corpus.write_text(" ".join(rng.choice(words) for _ in range(2000)) + "\n", encoding="utf-8")
    return [
        *TINY,
        f"data.path={corpus}",
        f"data.cache_dir={tmp / 'cache'}",
        f"train.output_dir={tmp / out}",
        *extra,
    ]


def recipe(flag: bool) -> Path:
    return RECIPES / ("shakespeare_char_df.yaml" if flag else "shakespeare_char_tf.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both systems trained 2 steps: {flag: (run dir, in-memory model)}."""
    tmp = tmp_path_factory.mktemp("forcing")
    out = {}
    for flag in (False, True):
        cfg = load_config(recipe(flag), overrides(tmp, f"df{int(flag)}", "train.max_steps=2"))
        run = build_run(cfg)
        train(cfg, run)
        out[flag] = (tmp / f"df{int(flag)}", run.model.eval())
    return out


@pytest.mark.parametrize("flag", [False, True])
def test_trained_checkpoint_reloads_with_identical_outputs(trained, flag):
    path, model = trained[flag]
    pre = load_pretrained(path)
    assert pre.config.task == ("diffusion_forcing" if flag else "teacher_forcing")
    assert not any("alpha_bar" in k for k in load_file(str(pre.path / "model.safetensors")))
    ids = torch.randint(0, pre.tokenizer.vocab_size, (2, pre.model.config.block_size))
    with torch.no_grad():
        if flag:
            x = torch.randn(2, ids.shape[1], 32)
            k = torch.randint(0, 100, ids.shape)
            assert torch.equal(pre.model(x, k), model(x, k))
        else:
            assert torch.equal(pre.model(ids), model(ids))


def test_one_flag_switches_the_system(tmp_path):
    cfg = load_config(recipe(False), overrides(tmp_path, "x", "model.use_diffusion_forcing=true"))
    run = build_run(cfg)
    assert cfg.task == "diffusion_forcing" and isinstance(run.objective, DiffusionForcingObjective)
    assert cfg.model.block_size == 16  # DF denoises whole blocks
    cfg = load_config(recipe(True), overrides(tmp_path, "y", "model.use_diffusion_forcing=false"))
    build_run(cfg)
    assert cfg.task == "teacher_forcing" and cfg.model.block_size == 15  # next-token loss sees block - 1


def test_levels_and_noise_come_from_prepare_and_split_evenly():
    torch.manual_seed(0)
    model = DFGPT(
        DFGPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16, use_diffusion_forcing=True)
    )
    task = DiffusionForcingObjective(model.config.gaussian, 16)
    ids = torch.randint(0, 20, (4, 8))
    a = task.prepare({"input_ids": ids}, torch.Generator().manual_seed(5))
    b = task.prepare({"input_ids": ids}, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["noise"].shape == (4, 8, 16)
    whole, _ = task.loss(model, a)
    halves = [task.loss(model, {k: v[i : i + 2] for k, v in a.items()})[0] for i in (0, 2)]
    torch.testing.assert_close(whole, sum(halves) / 2)  # micro-batches average to the global loss


def test_diffusion_forcing_resume_is_bit_identical(tmp_path):
    def run(out, *extra):
        cfg = load_config(
            recipe(True), overrides(tmp_path, out, "train.max_steps=6", "train.save_every=3", *extra)
        )
        train(cfg, build_run(cfg))

    run("full")
    run("part", "train.stop_at_step=3")
    run("part", "train.resume=latest")
    a = load_file(str(tmp_path / "full/checkpoints/step-6/model.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoints/step-6/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(out):
        lines = (tmp_path / out / "log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    assert len(losses("full")) == 6 and losses("full") == losses("part")


def test_eval_functions_return_finite_metrics(trained):
    tf, df = load_pretrained(trained[False][0]), load_pretrained(trained[True][0])
    args = EvalOptions(
        batch_size=4,
        max_batches=1,
        seed=0,
        device="cpu",
        judge=str(trained[False][0]),
        continuations=2,
        gen_length=6,
    )
    common = {"bleu", "chrf", "tokens_per_s", "gen_tokens", "gen_nll", "gen_ppl"}
    tf_metrics = eval_forcing(tf, args)
    df_metrics = eval_forcing(df, args)
    assert set(tf_metrics) == common | {"val_loss", "val_ppl"}
    assert set(df_metrics) == common | {"rounding_nll_clean", "rounding_nll_stab", "next_token_nll"}
    for value in [*tf_metrics.values(), *df_metrics.values()]:
        assert math.isfinite(value)
    assert df_metrics["gen_tokens"] == 12


def test_judge_nll_matches_direct_cross_entropy():
    torch.manual_seed(0)
    judge = DFGPT(DFGPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    seq = torch.randint(0, 20, (3, 13))
    logits = judge(seq[:, :-1])  # [3, 12, V]: fits one window
    expected = F.cross_entropy(logits[:, 3:].flatten(0, 1), seq[:, 4:].flatten())
    assert judge_nll(judge, seq[:, :4], seq[:, 4:]) == pytest.approx(expected.item(), rel=1e-5)
    longer = torch.randint(0, 20, (2, 40))  # past block_size: sliding windows, still finite
    assert math.isfinite(judge_nll(judge, longer[:, :5], longer[:, 5:]))


def test_held_out_windows_are_contiguous_val_text():
    val = [torch.arange(i * 4, i * 4 + 4) for i in range(10)]  # 40 consecutive tokens in blocks of 4
    prompts, refs = held_out_windows(val, ContinuationConfig(n_prompts=3, prompt_length=2, gen_length=5))
    assert prompts.tolist() == [[0, 1], [16, 17], [33, 34]]
    assert refs[2].tolist() == [35, 36, 37, 38, 39]


def test_generate_ar_without_cache_equals_greedy_recompute_past_block_size():
    torch.manual_seed(0)
    model = DFGPT(DFGPTConfig(vocab_size=20, block_size=6, n_layer=2, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 20, (2, 3))
    out = generate_ar(model, prompt, max_new_tokens=8, use_cache=False).tokens
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq[:, -6:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("flag", [False, True])
def test_sample_cli_both_systems(trained, flag, tmp_path, capsys):
    page = tmp_path / "trace.html"
    args = [
        "sample",
        str(trained[flag][0]),
        "--prompt",
        "the king",
        "--gen-length",
        "6",
        "--animate",
        str(page),
    ]
    assert main([*args, *(["--schedule", "full_sequence", "--horizon", "3"] if flag else [])]) == 0
    assert "--- sample 0 ---\nthe king" in capsys.readouterr().out and page.is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        ("model.gaussian.sampling_timesteps=2000", "sampling_timesteps 2000 > timesteps"),
        ("model.gaussian.objective=pred_y", "valid choices: pred_noise"),
        ("model.gaussian.beta_schedule=zigzag", "valid choices: linear, cosine, sigmoid"),
        ("model.gaussian.cum_snr_decay=1.5", "cum_snr_decay must be in (0, 1]"),
        ("system.horizon=0", "system.horizon must be >= 1"),
    ],
)
def test_train_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, extra, message):
    assert main(["train", str(recipe(True)), *overrides(tmp_path, "bad", extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--horizon", "0"], "horizon must be in [1, block_size"),
        (["--schedule", "zigzag"], "unknown scheduling matrix"),
    ],
)
def test_sample_cli_bad_input_exits_2_with_one_line(trained, capsys, extra, message):
    assert main(["sample", str(trained[True][0]), "--prompt", "the", "--gen-length", "4", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
