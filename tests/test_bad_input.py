"""Every bad input of issue 19 is refused by the CLI with exit 2 and one line naming the problem.

One tiny checkpoint is trained once for the module; each row of `CASES` runs `difflm.cli.main`
in-process on it (or on a tampered copy, made by the row's `setup`) and asserts the exit code, that
stderr is a single line, and that it names the bad key or flag. Rows marked `silent` were accepted
before and silently did the wrong thing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflm.cli import main
from difflm.train import checkpoint as ckpt
from tests.test_trainer import tiny_overrides


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # formatted with the paths of `Paths` ({run}, {step}, {file}, {ro}, {tmp}, {bad})
    expect: str  # must appear in the one-line error
    setup: Callable[[Path, Path], None] | None = None  # (base step folder, folder {bad}) -> writes {bad}


@dataclass
class Paths:
    run: Path  # the trained run folder
    step: Path  # its latest step folder
    tmp: Path  # scratch space for this row
    file: Path  # a plain file
    ro: Path  # a folder this process cannot write into


def train_argv(*extra: str) -> tuple[str, ...]:
    """`difflm train` on the tiny recipe of tests/test_trainer.py (expanded per row), then `extra`."""
    return ("@train", *extra)


SAMPLE = ("sample", "{run}", "--prompt", "the", "--gen-length", "4")
EVAL = ("eval", "{run}", "--samples", "1")
COMPARE = ("compare", "{run}", "{run}", "--prompt", "the", "--gen-length", "4")


# ----------------------------------------------------------------------------- tampering


def copy_step(base: Path, bad: Path) -> None:
    shutil.copytree(base, bad)


def rehash(folder: Path) -> None:
    """Rewrite the manifest after a tampering, as a careless (or hostile) editor would."""
    tied = json.loads((folder / ckpt.MANIFEST_FILE).read_text())["tied"]
    ckpt._write_manifest(folder, tied)


def edit_weights(bad: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(str(bad / ckpt.MODEL_FILE))
    change(tensors)
    save_file(tensors, str(bad / ckpt.MODEL_FILE))
    rehash(bad)


def flip_bytes(base: Path, bad: Path) -> None:
    copy_step(base, bad)
    data = bytearray((bad / ckpt.MODEL_FILE).read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the last tensor, after the header
        data[i] = 0xFF
    (bad / ckpt.MODEL_FILE).write_bytes(bytes(data))


def drop_layer(base: Path, bad: Path) -> None:
    copy_step(base, bad)
    edit_weights(bad, lambda t: [t.pop(k) for k in list(t) if k.startswith("blocks.1.")])


def add_tensor(base: Path, bad: Path) -> None:
    copy_step(base, bad)
    edit_weights(bad, lambda t: t.update({"extra.weight": torch.zeros(3)}))


def nan_weights(base: Path, bad: Path) -> None:
    copy_step(base, bad)
    edit_weights(bad, lambda t: t["tok_emb.weight"].fill_(float("nan")))


def cut_tokenizer(base: Path, bad: Path, manifest_fixed: bool = True) -> None:
    copy_step(base, bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    data["chars"] = data["chars"][1:]  # one character removed: every later id shifts
    (bad / "tokenizer.json").write_text(json.dumps(data))
    if manifest_fixed:
        rehash(bad)


def edit_config(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def setup(base: Path, bad: Path) -> None:
        copy_step(base, bad)
        cfg = json.loads((bad / ckpt.RUN_CONFIG_FILE).read_text())
        change(cfg)
        (bad / ckpt.RUN_CONFIG_FILE).write_text(json.dumps(cfg))
        rehash(bad)

    return setup


def write_file(name: str, data: bytes) -> Callable[[Path, Path], None]:
    def setup(base: Path, bad: Path) -> None:
        copy_step(base, bad)
        (bad / name).write_bytes(data)

    return setup


def run_with_latest(text: bytes) -> Callable[[Path, Path], None]:
    """A run folder {bad} whose checkpoints/latest holds `text`."""

    def setup(base: Path, bad: Path) -> None:
        shutil.copytree(base.parent.parent, bad)
        (bad / "checkpoints" / "latest").write_bytes(text)

    return setup


def qwen3_source(config: str) -> Callable[[Path, Path], None]:
    def setup(base: Path, bad: Path) -> None:
        bad.mkdir()
        (bad / "config.json").write_text(config)

    return setup


def with_file(name: str, data: bytes) -> Callable[[Path, Path], None]:
    def setup(base: Path, bad: Path) -> None:
        bad.mkdir()
        (bad / name).write_bytes(data)

    return setup


SAMPLE_BAD = ("sample", "{bad}", "--prompt", "the", "--gen-length", "4")
QWEN3_CONFIG = json.dumps({"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32})

CASES = [
    # --- train: the run folder
    Case("output-dir-is-a-file", train_argv("train.output_dir={file}"), "is a file"),
    Case("output-dir-read-only", train_argv("train.output_dir={ro}/run"), "train.output_dir"),
    Case("retrain-into-a-run", train_argv("train.output_dir={run}"), "already holds a run"),
    Case("overwrite-and-resume", train_argv("train.overwrite=true", "train.resume=latest"), "overwrite"),
    # --- train: numbers
    Case("log-every-0", train_argv("train.log_every=0"), "train.log_every"),
    Case("stop-at-step-negative", train_argv("train.stop_at_step=-1"), "train.stop_at_step"),
    Case("lr-negative", train_argv("train.lr=-1"), "train.lr"),
    Case("lr-nan", train_argv("train.lr=.nan"), "train.lr"),
    Case("lr-inf", train_argv("train.lr=.inf"), "train.lr"),
    Case("beta1-above-1", train_argv("train.beta1=1.5"), "train.beta1"),
    Case("seed-huge", train_argv("train.seed=1e23"), "train.seed"),
    Case("seed-huge-int", train_argv(f"train.seed={10**30}"), "train.seed"),
    Case("warmup-negative (silent)", train_argv("train.warmup_steps=-10"), "train.warmup_steps"),
    Case("device-tpu", train_argv("train.device=tpu"), "train.device"),
    Case("model-not-a-mapping", train_argv("model=3"), "model"),
    Case("huge-model-on-command-line", train_argv("model.n_layer=1000000000"), "parameters"),
    Case(
        "resume-other-shape",
        train_argv("train.resume={step}", "model.n_embd=64"),
        "do not match the model config",
    ),
    # --- sample: flags
    Case("sample-batch-size-0", (*SAMPLE, "--batch-size", "0"), "--batch-size"),
    Case("sample-batch-size-negative", (*SAMPLE, "--batch-size", "-1"), "--batch-size"),
    Case("sample-device-tpu", (*SAMPLE, "--device", "tpu"), "--device"),
    Case("sample-device-cuda-missing", (*SAMPLE, "--device", "cuda:7"), "--device"),
    Case("sample-animate-txt", (*SAMPLE, "--animate", "{tmp}/x.txt"), "--animate"),
    Case("sample-animate-missing-folder", (*SAMPLE, "--animate", "{tmp}/nowhere/x.gif"), "--animate"),
    Case("sample-animate-read-only", (*SAMPLE, "--animate", "{ro}/x.gif"), "--animate"),
    Case(
        "sample-prompt-file-binary",
        (*SAMPLE, "--prompt-file", "{bad}"),
        "prompt file",
        lambda base, bad: bad.write_bytes(b"\xff\xfe\x00\x81binary"),
    ),
    Case("sample-temperature-nan (silent)", (*SAMPLE, "--temperature", "nan"), "--temperature"),
    Case("sample-temperature-inf (silent)", (*SAMPLE, "--temperature", "inf"), "--temperature"),
    Case("sample-block-attention-alone (silent)", (*SAMPLE, "--block-attention"), "--block-attention"),
    Case("sample-schedule-on-masked (silent)", (*SAMPLE, "--schedule", "pyramid"), "--schedule"),
    # --- checkpoints: malformed and tampered
    Case("manifest-malformed", SAMPLE_BAD, "manifest.json", write_file(ckpt.MANIFEST_FILE, b"{not json")),
    Case("manifest-not-an-object", SAMPLE_BAD, "manifest.json", write_file(ckpt.MANIFEST_FILE, b"[1, 2]")),
    Case("difflm-json-malformed", SAMPLE_BAD, "difflm.json", write_file(ckpt.RUN_CONFIG_FILE, b"{")),
    Case("latest-binary", SAMPLE_BAD, "latest", run_with_latest(b"\x00\xff\xfe\x80")),
    Case("latest-traversal", SAMPLE_BAD, "latest", run_with_latest(b"../../../etc\n")),
    Case("flipped-bytes", SAMPLE_BAD, "sha256", flip_bytes),
    Case("missing-tensors", SAMPLE_BAD, "missing", drop_layer),
    Case("extra-tensor", SAMPLE_BAD, "unexpected 1 tensor(s): extra.weight", add_tensor),
    Case("nan-weights-rehashed", SAMPLE_BAD, "NaN", nan_weights),
    Case(
        "cut-tokenizer", SAMPLE_BAD, "tokenizer.json", lambda b, d: cut_tokenizer(b, d, manifest_fixed=False)
    ),
    Case("cut-tokenizer-rehashed", SAMPLE_BAD, "tokenizer", cut_tokenizer),
    Case("huge-config", SAMPLE_BAD, "parameters", edit_config(lambda c: c["model"].update(n_layer=10**9))),
    Case(
        "config-nan-in-checkpoint",
        SAMPLE_BAD,
        "train.lr",
        edit_config(lambda c: c["train"].update(lr=float("nan"))),
    ),
    Case(
        "config-bad-device-in-checkpoint",
        SAMPLE_BAD,
        "train.device",
        edit_config(lambda c: c["train"].update(device="tpu")),
    ),
    # --- eval
    Case("eval-batch-size-0", (*EVAL, "--batch-size", "0"), "--batch-size"),
    Case("eval-max-batches-negative", (*EVAL, "--max-batches", "-1"), "--max-batches"),
    Case("eval-max-batches-0 (silent)", (*EVAL, "--max-batches", "0"), "--max-batches"),
    Case("eval-device-tpu", (*EVAL, "--device", "tpu"), "--device"),
    # --- compare
    Case("compare-out-read-only", (*COMPARE, "--out", "{ro}/c.gif"), "--out"),
    Case("compare-out-folder", (*COMPARE, "--out", "{tmp}"), "--out"),
    Case("compare-out-no-extension", (*COMPARE, "--out", "{tmp}/c"), "--out"),
    # --- convert
    Case("convert-into-a-file", ("convert", "--from", "qwen3", "{tmp}", "{file}"), "is a file"),
    Case("convert-into-read-only", ("convert", "--from", "qwen3", "{tmp}", "{ro}/out"), "cannot write"),
    Case(
        "convert-no-weights",
        ("convert", "--from", "qwen3", "{bad}", "{tmp}/out"),
        "safetensors",
        qwen3_source(QWEN3_CONFIG),
    ),
    Case(
        "convert-broken-config",
        ("convert", "--from", "qwen3", "{bad}", "{tmp}/out"),
        "config.json",
        qwen3_source("{broken"),
    ),
    Case(
        "convert-empty-mask-token (silent)",
        ("convert", "--from", "qwen3", "{tmp}", "{tmp}/o", "--mask-token", ""),
        "--mask-token",
    ),
    # --- inspect
    Case(
        "inspect-truncated",
        ("inspect", "{bad}/model.safetensors", "{step}"),
        "safetensors",
        lambda base, bad: with_file(ckpt.MODEL_FILE, (base / ckpt.MODEL_FILE).read_bytes()[:200])(base, bad),
    ),
    Case("inspect-not-safetensors", ("inspect", "{file}", "{step}"), "safetensors"),
    # --- data
    Case("build-poems-into-a-file", ("data", "build-poems", "{file}", "{file}"), "is a file"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-input")
    argv = ["train", "shakespeare_char", *tiny_overrides(tmp, "run", "train.max_steps=2", "model.n_layer=2")]
    assert main(argv) == 0
    return tmp / "run"


def read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot write: chmod 555, or (as root, who ignores modes) /sys."""
    if os.geteuid() != 0:
        ro = tmp / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    try:
        (Path("/sys") / ".difflm-probe").write_text("")
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder to test with")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, trained: Path, tmp_path: Path, capsys) -> None:
    paths = Paths(trained, ckpt.resolve_checkpoint(trained), tmp_path, tmp_path / "a-file.txt", Path())
    paths.file.write_text("not a folder\n")
    if "{ro}" in " ".join(case.argv):
        paths.ro = read_only_dir(tmp_path)
    bad = tmp_path / "bad"
    if case.setup is not None:
        case.setup(paths.step, bad)
    argv = [a.format(**vars(paths), bad=bad) for a in case.argv]
    if argv[0] == "@train":
        argv = ["train", "shakespeare_char", *tiny_overrides(tmp_path, "out", "train.max_steps=2"), *argv[1:]]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert case.expect in err, err
    assert "Traceback" not in err


def test_cases_cover_issue_19() -> None:
    assert len(CASES) >= 41 + 6  # the 41 crashes and the 6 silent inputs of the issue (and more)


def test_unexpected_error_is_one_line_with_a_debug_hint(trained: Path, capsys, monkeypatch) -> None:
    import difflm.pretrained

    def boom(*args, **kwargs):
        raise ValueError("something\nbroke")

    monkeypatch.setattr(difflm.pretrained, "load_pretrained", boom)
    assert main([*[a.format(run=trained) for a in SAMPLE]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ValueError: something" in err and "--debug" in err
    with pytest.raises(ValueError, match="something"):
        main([*[a.format(run=trained) for a in SAMPLE], "--debug"])


def test_overrides_after_a_flag(trained: Path, capsys) -> None:
    assert main(["train", "shakespeare_char", "--print-config", "model.n_layer=3", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "n_layer: 3" in out and "lr: 0.5" in out
    with pytest.raises(SystemExit):
        main(["train", "shakespeare_char", "--print-config", "--no-such-flag"])
