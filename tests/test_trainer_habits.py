"""The trainer's nanoGPT / MDLM habits: best checkpoint, patience, EMA, compile, FLOPs and MFU."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from difflm.cli import main
from difflm.config import load_config
from difflm.errors import DifflmError
from difflm.models.transformer import Transformer, TransformerConfig
from difflm.pretrained import load_pretrained
from difflm.systems.registry import build_run
from difflm.train import checkpoint as ckpt
from difflm.train import flops
from difflm.train.trainer import Run, train
from tests.test_trainer import losses, tiny_overrides

RECIPE = "recipes/shakespeare_char.yaml"
DATA = [torch.arange(4) + i for i in range(8)]  # 8 rows of 4 "tokens", read as floats by a Linear


class ScriptedObjective:
    """Trains a Linear on mean(y^2); in eval mode the "val loss" is the next value of a script
    (or, with no script, that same loss)."""

    def __init__(self, val_losses: list[float] | None = None):
        self.val_losses = iter(val_losses) if val_losses is not None else None

    def prepare(self, batch, generator):
        return batch

    def loss(self, model, batch):
        if not model.training and self.val_losses is not None:
            return torch.tensor(next(self.val_losses)), {}
        return model(batch["input_ids"].float()).pow(2).mean(), {}


def linear_run(val_losses: list[float] | None = None) -> Run:
    torch.manual_seed(0)
    return Run(torch.nn.Linear(4, 4), ScriptedObjective(val_losses), DATA, DATA)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def config(tmp_path: Path, out: str, *extra: str):
    return load_config(RECIPE, tiny_overrides(tmp_path, out, "train.batch_size=4", *extra))


def state_of(folder: Path) -> dict:
    return json.loads((folder / ckpt.STATE_FILE).read_text())


# ----------------------------------------------------------------------------- best and patience


def test_keep_best_and_patience_stop_after_the_plateau(tmp_path):
    cfg = config(
        tmp_path,
        "r",
        "train.max_steps=10",
        "train.eval_every=1",
        "train.save_every=1",
        "train.keep_last=0",
        "train.keep_best=true",
        "train.patience=2",
    )
    state = train(cfg, linear_run([3.0, 2.0, 2.5, 2.0, 9.0]))  # best at step 2, then 2 without better
    root = tmp_path / "r/checkpoints"
    assert state.step == 4 and (root / "latest").read_text().strip() == "step-4"
    best = state_of(root / "best")
    assert (best["step"], best["val_loss"], best["best_val_loss"]) == (2, 2.0, 2.0)
    assert same(
        load_file(str(root / "best/model.safetensors")), load_file(str(root / "step-2/model.safetensors"))
    )
    assert not (root / "best" / ckpt.OPTIMIZER_FILE).exists()
    assert (state.best_val_loss, state.evals_since_best) == (2.0, 2)
    last = json.loads((tmp_path / "r/log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and "train.patience" in last["early_stop"]


def test_resume_continues_the_best_loss_and_patience(tmp_path):
    extra = ("train.max_steps=10", "train.eval_every=1", "train.save_every=1", "train.patience=2")
    train(config(tmp_path, "r", *extra, "train.stop_at_step=3"), linear_run([3.0, 2.0, 2.5]))
    saved = state_of(tmp_path / "r/checkpoints/step-3")
    assert (saved["best_val_loss"], saved["evals_since_best"]) == (2.0, 1)
    state = train(config(tmp_path, "r", *extra, "train.resume=latest"), linear_run([2.0, 9.0]))
    assert state.step == 4 and state.evals_since_best == 2  # as the uninterrupted run above


def test_best_survives_a_crash_while_replacing_it(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    folder = dict(model=model, run_config={}, trainer_state={"step": 1})
    best = ckpt.save_best(tmp_path, **folder)
    before = (best / ckpt.MODEL_FILE).read_bytes()

    def explode(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_manifest", explode)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_best(tmp_path, **folder)
    assert (best / ckpt.MODEL_FILE).read_bytes() == before
    ckpt.verify_checkpoint(best)
    best.rename(best.with_name(".old-best"))  # killed between the swap's two renames
    ckpt.remove_leftovers(best.parent, (".tmp-", ".old-"))
    assert (best / ckpt.MODEL_FILE).read_bytes() == before and not list(best.parent.glob(".*"))


# ----------------------------------------------------------------------------- EMA


def test_ema_is_the_hand_computed_average(tmp_path):
    cfg = config(
        tmp_path, "r", "train.max_steps=3", "train.save_every=1", "train.keep_last=0", "train.ema=0.5"
    )
    run = linear_run()
    average = {k: v.detach().clone() for k, v in run.model.state_dict().items()}  # starts at the init
    state = train(cfg, run)
    root = tmp_path / "r/checkpoints"
    for step in (1, 2, 3):
        raw = load_file(str(root / f"step-{step}" / ckpt.MODEL_FILE))
        average = {k: 0.5 * average[k] + 0.5 * raw[k] for k in raw}  # exact: halves are exact in fp32
        assert same(load_file(str(root / f"step-{step}" / ckpt.EMA_FILE)), average)
    assert same(run.model.state_dict(), raw)  # the model itself trains on (and keeps) the raw weights
    held = torch.nn.Linear(4, 4)
    held.load_state_dict(average)
    with torch.no_grad():  # validation used the average: the loss of the first val batch
        assert state.val_loss == ScriptedObjective().loss(held, {"input_ids": torch.stack(DATA[:4])})[0].item()


def test_ema_resume_is_exact(tmp_path):
    extra = ("train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.ema=0.9")
    full = load_config(RECIPE, tiny_overrides(tmp_path, "full", *extra))
    train(full, build_run(full))
    part = load_config(RECIPE, tiny_overrides(tmp_path, "part", *extra, "train.stop_at_step=2"))
    train(part, build_run(part))
    again = load_config(RECIPE, tiny_overrides(tmp_path, "part", *extra, "train.resume=latest"))
    train(again, build_run(again))
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        a, b = (load_file(str(tmp_path / r / "checkpoints/step-4" / name)) for r in ("full", "part"))
        assert same(a, b), name


def test_eval_and_sample_take_the_best_folder_with_its_average(tmp_path, capsys):
    extra = ("train.max_steps=2", "train.eval_every=1", "train.ema=0.9", "train.keep_best=true")
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "r", *extra))
    train(cfg, build_run(cfg))
    best = tmp_path / "r/checkpoints/best"
    pre = load_pretrained(best)  # what `difflm eval` / `sample` / `serve` load
    ema = load_file(str(best / ckpt.EMA_FILE))
    assert pre.path == best and all(torch.equal(pre.model.state_dict()[k], ema[k]) for k in ema)
    assert not same(ema, load_file(str(best / ckpt.MODEL_FILE)))
    assert main(["eval", str(best), "--device", "cpu"]) == 0
    assert main(["sample", str(best), "--prompt", "the", "--gen-length", "8", "--device", "cpu"]) == 0
    assert str(best) in capsys.readouterr().out


# ----------------------------------------------------------------------------- FLOPs and MFU


def test_flops_per_token_matches_a_hand_count():
    cfg = TransformerConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mask_token_id=63)
    model = Transformer(cfg)
    C = 32
    n_params = 64 * C + 2 * (2 * C + 3 * C * C + C * C + 2 * 4 * C * C) + C  # tied emb, 2 blocks, norm_f
    assert sum(p.numel() for p in model.parameters()) == n_params == 26784
    shape = flops.attention_shape(model.config)
    assert shape == (2, 2, 16)
    assert flops.flops_per_token(shape, n_params, 16) == 6 * 26784 + 12 * 2 * 2 * 16 * 16 == 172992
    hf = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, hidden_size=64)
    assert flops.attention_shape(hf) == (3, 4, 16)
    assert flops.attention_shape(SimpleNamespace(**vars(hf), head_dim=8)) == (3, 4, 8)
    assert flops.attention_shape(None) is None


def test_peak_flops_table_and_override():
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), 2.5) == 2.5e12
    assert flops.PEAK_TFLOPS["H200"] == flops.PEAK_TFLOPS["H100"] == 989.0


def test_log_has_tflops_and_mfu_only_with_a_peak(tmp_path):
    for out, peak in (("cpu", ()), ("peak", ("train.peak_tflops=0.5",))):
        cfg = load_config(RECIPE, tiny_overrides(tmp_path, out, "train.max_steps=1", *peak))
        run = build_run(cfg)
        train(cfg, run)
        record = json.loads((tmp_path / out / "log.jsonl").read_text().splitlines()[0])
        n_params = sum(p.numel() for p in run.model.parameters())
        achieved = flops.flops_per_token((2, 2, 16), n_params, 16) * record["tok_s"]
        assert record["tflops"] == achieved / 1e12
        assert record.get("mfu") == (achieved / 0.5e12 if peak else None)


# ----------------------------------------------------------------------------- compile and config


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: tens of seconds
def test_compile_trains_a_tiny_model(tmp_path):
    cfg = load_config(RECIPE, tiny_overrides(tmp_path, "c", "train.max_steps=3", "train.compile=true"))
    train(cfg, build_run(cfg))
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "c"))))
    pre = load_pretrained(tmp_path / "c")  # saved from the bare model: no "_orig_mod." in the names
    assert pre.path.name == "step-3"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.ema=1.0"], r"train.ema must be in \[0, 1\), got 1.0"),
        (["train.ema=-0.1"], r"train.ema must be in \[0, 1\), got -0.1"),
        (["train.patience=-1"], r"train.patience must be in \[0, inf\), got -1"),
        (["train.peak_tflops=-1"], r"train.peak_tflops must be in \[0, inf\), got -1"),
        (["train.eval_every=0", "train.patience=3"], "set train.eval_every > 0"),
        (["train.ema=0.9", "train.strategy=fsdp"], "train.ema with train.strategy=fsdp is not supported"),
        (["train.keep_best=true", "train.strategy=fsdp"], "train.keep_best with train.strategy=fsdp"),
    ],
)
def test_bad_habit_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(DifflmError, match=message):
        load_config(RECIPE, tiny_overrides(tmp_path, "x", *overrides))


# ----------------------------------------------------------------------------- init_from


def test_init_from_starts_a_diffusion_run_from_ar_weights(tmp_path):
    """AR -> diffusion: the bidirectional model starts from the causal run's weights (an lr of 1e-30
    moves no fp32 weight of size ~0.02, so the saved step-1 weights are the starting ones)."""
    ar = load_config("recipes/shakespeare_char_ar.yaml", tiny_overrides(tmp_path, "ar", "train.max_steps=2"))
    train(ar, build_run(ar))
    frozen = (
        "train.max_steps=1",
        "train.lr=1e-30",
        "train.min_lr=1e-30",
        f"train.init_from={tmp_path / 'ar'}",
    )
    cfg = config(tmp_path, "mdm", *frozen)
    train(cfg, build_run(cfg))
    start = load_file(str(tmp_path / "ar/checkpoints/step-2" / ckpt.MODEL_FILE))
    assert same(load_file(str(tmp_path / "mdm/checkpoints/step-1" / ckpt.MODEL_FILE)), start)
    assert load_pretrained(tmp_path / "mdm").config.model.causal is False


def test_init_from_keeps_the_checkpoints_char_vocabulary_on_other_text(tmp_path):
    """Fine-tuning on text with fewer characters reads ids as the weights learned them: a vocabulary
    rebuilt from the new text would be smaller (a shape error) and renumber every character."""
    base = config(tmp_path, "base", "train.max_steps=1")
    train(base, build_run(base))
    vocab = load_pretrained(tmp_path / "base").tokenizer
    narrow = tmp_path / "narrow.txt"
    narrow.write_text("the king speaks to the night\n" * 200, encoding="utf-8")  # no c, d, f, l, ...
    cfg = config(
        tmp_path,
        "tuned",
        "train.max_steps=1",
        f"data.path={narrow}",
        f"train.init_from={tmp_path / 'base'}",
    )
    train(cfg, build_run(cfg))
    tuned = load_pretrained(tmp_path / "tuned").tokenizer
    assert tuned.vocab_size == vocab.vocab_size > len(set(narrow.read_text()))
    assert tuned.encode("speak") == vocab.encode("speak")


def test_init_from_a_different_shape_is_a_one_line_error(tmp_path):
    ar = load_config("recipes/shakespeare_char_ar.yaml", tiny_overrides(tmp_path, "ar", "train.max_steps=1"))
    train(ar, build_run(ar))
    cfg = config(tmp_path, "mdm", "model.n_embd=16", f"train.init_from={tmp_path / 'ar'}")
    with pytest.raises(DifflmError, match="shape"):
        train(cfg, build_run(cfg))
