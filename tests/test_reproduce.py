"""benchmarks/reproduce.py: the smoke scale of every experiment end to end (synthetic corpora, no
shared data), a finished run reused rather than retrained, and the gpu preset's dry run (every
model built and trained 2 steps on the CPU)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # as when run: the script imports presets.py beside it
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


reproduce = load_script()
COMMON_FILES = ["reproduce.json", "command.txt", "train_curves.png", "table.md", "results.json", "samples.md"]
FILES = {  # besides COMMON_FILES
    "shakespeare": ["curves.png"],
    "poems": ["results.csv", "plot.png", "rescored/table.md", "rescored/results.json"],
    "forcing": ["forcing_vs_teacher.png"],
    "forcing_long": ["forcing_vs_teacher.png"],
    "sgdd": ["curves.png"],
    "shakespeare_long": ["curves.png"],
    "a2d": ["curves.png"],
}
FIGURES = {  # results.json -> the figures each experiment must report
    "shakespeare": lambda r: [x[k] for x in r["results"] for k in ("val_nll", "gen_ppl", "words_in_corpus")],
    "shakespeare_long": lambda r: [x[k] for x in r["results"] for k in ("val_nll", "gen_ppl")],
    "a2d": lambda r: [run["val_loss"] for run in r["runs"].values()],
    "poems": lambda rows: [row["accuracy"] for row in rows] + [row["chrf"] for row in rows],
    "forcing": lambda r: [
        r["teacher forcing"]["val_loss"],
        r["teacher forcing"]["gen_ppl"],
        r["diffusion forcing"]["next_token_nll"],
        r["diffusion forcing"]["gen_ppl"],
    ],
    "forcing_long": lambda r: [r["teacher forcing"]["gen_ppl"], r["diffusion forcing"]["next_token_nll"]],
    "sgdd": lambda r: [
        s[k] for run in r["runs"] for s in run["settings"] for k in ("bleu", "chrf", "cosine")
    ],
}


FAST = ("shakespeare", "forcing")  # poems and sgdd cost as much again: in the slow suite
SMOKE = [
    name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in reproduce.EXPERIMENTS
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`reproduce.py NAME --scale smoke` once per experiment, into a temp folder, with a data dir that
    does not exist (the synthetic corpora stand in); returns NAME -> its work folder."""
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            work = tmp_path_factory.mktemp(name)
            args = [name, "--scale", "smoke", "--work-dir", str(work), "--data-dir", str(work / "no-data")]
            assert reproduce.main(args) == 0
            done[name] = work
        return done[name]

    return run


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_writes_every_output_with_finite_figures(smoke, name):
    out = smoke(name) / "results"
    for file in [*COMMON_FILES, *FILES[name]]:
        assert (out / file).is_file() and (out / file).stat().st_size > 0, file
    figures = FIGURES[name](json.loads((out / "results.json").read_text()))
    assert figures and all(math.isfinite(x) for x in figures), figures
    summary = json.loads((out / "reproduce.json").read_text())
    preset = reproduce.PRESETS[name]["smoke"]
    assert summary["preset"]["batch_size"] == preset.batch_size
    assert summary["wall_seconds"] > 0 and summary["hardware"]["cores"] >= 1 and summary["hardware"]["torch"]
    assert set(summary["runs"]) == {run.name for run in preset.runs}
    for run in summary["runs"].values():
        assert (
            not run["reused"] and run["curve"][-1][0] == run["steps"] and math.isfinite(run["curve"][-1][1])
        )
    commands = (out / "command.txt").read_text().splitlines()
    assert sum(" train " in c for c in commands) == len(preset.runs) and commands == summary["commands"]


def test_a_finished_run_is_reused_not_retrained(smoke, tmp_path, capsys):
    work = smoke("shakespeare")
    weights = sorted(work.glob("ref_*/checkpoints/step-3/model.safetensors"))
    before = [p.stat().st_mtime_ns for p in weights]
    capsys.readouterr()
    args = ["shakespeare", "--scale", "smoke", "--work-dir", str(work), "--out", str(tmp_path)]
    assert reproduce.main(args) == 0
    printed = capsys.readouterr().out
    assert len(weights) == 4 and printed.count("[reproduce] reuse ") == 4 and " train " not in printed
    assert [p.stat().st_mtime_ns for p in weights] == before
    summary = json.loads((tmp_path / "reproduce.json").read_text())
    assert all(run["reused"] for run in summary["runs"].values())
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(reproduce.EXPERIMENTS))
def test_gpu_dry_run_builds_and_steps_every_model(name, tmp_path):
    assert reproduce.main([name, "--scale", "gpu", "--dry-run", "--work-dir", str(tmp_path)]) == 0
    preset = reproduce.PRESETS[name]["gpu"]
    for run in preset.runs:
        step = tmp_path / "dry_run" / run.name / "checkpoints" / "step-2"
        assert json.loads((step / "trainer_state.json").read_text())["step"] == 2
        config = json.loads((step / "difflm.json").read_text())
        assert config["train"]["device"] == "cpu" and config["train"]["batch_size"] == 2
        for item in preset.model.split():  # the model was built at the preset's size
            key, value = item.split("=")
            section, field = key.split(".", 1)
            assert str(config[section][field]) == value, item


def test_every_experiment_has_every_scale_and_gpu_presets_use_cuda_bf16():
    assert set(reproduce.PRESETS) == set(reproduce.EXPERIMENTS)
    for name, scales in reproduce.PRESETS.items():
        assert set(scales) == set(reproduce.SCALES), name
        assert scales["gpu"].device == "cuda" and scales["gpu"].precision == "bf16", name
        for preset in scales.values():
            assert len({run.name for run in preset.runs}) == len(preset.runs), name


def test_a_run_started_from_another_trains_after_it_and_stops_where_its_preset_says(tmp_path):
    preset = reproduce.PRESETS["poems"]["cpu"]
    runs = {run.name: run for run in preset.runs}
    stages = reproduce.training_stages(list(preset.runs))
    assert [r.name for r in stages[-1]] == ["poems_prefix_diffusion"]
    assert runs["poems_prefix_diffusion"] not in stages[0]
    argv = reproduce.train_job(
        preset, runs["poems_prefix_diffusion"], [], tmp_path / "poems_prefix_diffusion"
    ).argv
    init = f"train.init_from={tmp_path / 'poems_ar' / 'checkpoints' / 'step-400'}"
    assert {"train.max_steps=600", "train.stop_at_step=400", init} <= set(argv)


def test_legs_train_in_order_and_a_cycle_is_refused():
    legs = reproduce.PRESETS["forcing_long"]["cpu"].runs
    stages = [[run.name for run in stage] for stage in reproduce.training_stages(list(legs))]
    assert stages == [["tf", "df"], ["df_leg2"], ["df_leg3"], ["df_leg4"]]
    a2d = [[run.name for run in stage] for stage in reproduce.training_stages(list(reproduce.PRESETS["a2d"]["cpu"].runs))]
    assert a2d == [["ar", "scratch"], ["from_ar", "from_ar_block"]]  # converted from ar, after it
    loop = [reproduce.Run("a", "r", 1, init_from="b"), reproduce.Run("b", "r", 1, init_from="a")]
    with pytest.raises(SystemExit, match="cycle"):
        reproduce.training_stages(loop)
