"""Reproduce an experiment in one command: train what it needs (or reuse finished runs), evaluate, write results.

    python benchmarks/reproduce.py EXPERIMENT --scale smoke|cpu|gpu [--data-dir DIR] [--work-dir DIR] \
        [--out DIR] [--dry-run]

EXPERIMENT is shakespeare (AR / masked diffusion / BD3 K=4, K=16), shakespeare_long (the same to
the AR plateau, and diffusion started from the AR weights), poems (prefix diffusion vs AR
poem completion), forcing (Diffusion Forcing vs teacher forcing), forcing_long (Diffusion Forcing
trained in legs to its 2.0 nats/char target, against teacher forcing), sgdd (phase-1 reconstruction, a
MiniLM-initialised and a from-scratch decoder), a2d (a causal Qwen3 converted into Qwen3-LLaDA vs
Qwen3-LLaDA from scratch) or all. Every setting of every experiment at every
scale is one `Preset` in `PRESETS` (benchmarks/presets.py); nothing here picks a size, a step count or
an eval flag.

- Training: one `difflm train` process per run (stdout and stderr in WORK/NAME.log), two side by
  side, `threads` each. A run folder that already holds `checkpoints/step-{steps}` is reused, not
  retrained (point --work-dir at earlier runs with the same names); one holding an earlier
  checkpoint is resumed.
- Evaluation: the benchmark scripts (`benchmarks/shakespeare_core.py`, `forcing_vs_teacher.py`,
  `sgdd.py`), `difflm eval poem-completion` and `difflm sample`, writing into --out.
- Also into --out: reproduce.json (the preset, every command, each run's validation curve, wall time,
  hardware), command.txt (every command, in order), train_curves.png, samples.md.
- Scales: smoke runs the pipeline in seconds on synthetic corpora it writes into the work folder (no
  data needed, for CI); cpu is sized for <= 60 min per model on a 2-core CPU; gpu for the whole suite
  in <= 10 min on one H200. --dry-run builds every model of the preset and trains it 2 steps on the
  CPU (synthetic corpora, batch 2, fp32), then stops: a check of the gpu preset without a GPU.
- Corpora: --data-dir, else $DIFFLM_DATA_DIR, else ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from presets import PRESETS, SCALES, SIDE_BY_SIDE, Preset, Run  # benchmarks/presets.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DIFFLM = (sys.executable, "-m", "difflm.cli")


@dataclass
class Job:
    """One process: its command line, its log, and where its stdout goes when kept apart from the log."""

    argv: list[str]
    log: Path
    stdout: Path | None = None

    @property
    def command(self) -> str:
        """The command line as run, with paths inside the repository written relative to it."""
        return shlex.join(["python", *(arg.replace(f"{REPO}/", "") for arg in self.argv[1:])])


# ----------------------------------------------------------------------------------------------
# Corpora: the shared data, or synthetic stand-ins for smoke and dry runs
# ----------------------------------------------------------------------------------------------

WORDS = (
    "the king queen lord lady good night love death heart eyes sweet fair sir come go speak hear know "
    "make give take blood crown sword grace honour time day world son father mother brother friend "
    "thee thou thy shall will would not yet now here there what why how"
).split()
SPEAKERS = ("ROMEO", "JULIET", "KING HENRY", "QUEEN", "FIRST CITIZEN", "MENENIUS")
HANZI = "我想在春天的早晨醒来风吹过山岗夜里河流们灯下读信雪落远方大海蓝色梦一只鸟飞屋顶太阳升起了花开月光"


def default_data_dir() -> Path:
    found = os.environ.get("DIFFLM_DATA_DIR")
    return Path(found) if found else REPO.parent / "shared" / "data"


def synthetic_corpora(folder: Path, sentences: int) -> Path:
    """Tiny seeded stand-ins for the shared corpora, under their file names; returns `folder`."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)

    def line(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    plays = [f"{rng.choice(SPEAKERS)}:\n{line(8).capitalize()},\n{line(6)}.\n" for _ in range(600)]
    (folder / "tinyshakespeare.txt").write_text("\n".join(plays), encoding="utf-8")
    texts = [f"{line(rng.randint(4, 9)).capitalize()}." for _ in range(sentences)]
    (folder / "sentences_en.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    poems = []
    for i in range(60):
        verses = ["".join(rng.choice(HANZI) for _ in range(rng.randint(4, 9))) for _ in range(4)]
        poems.append(json.dumps({"title": f"诗{i}", "author": "佚名", "content": "\n\n".join(verses)}))
    (folder / "modern_poems.jsonl").write_text("\n".join(poems) + "\n", encoding="utf-8")
    (folder / "wikitext2_test.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    pairs = [json.dumps({"source": a, "target": b}) for a, b in zip(texts[::2], texts[1::2], strict=False)]
    (folder / "paws_pairs.jsonl").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return folder


def corpus_file(data_dir: Path, name: str) -> Path:
    if not (data_dir / name).is_file():
        raise SystemExit(
            f"reproduce: {data_dir / name} not found: point --data-dir (or $DIFFLM_DATA_DIR) at the corpora"
        )
    return data_dir / name


def text_corpus(name: str) -> Callable[[Path, Path], tuple[list[str], list[Job]]]:
    """Data overrides of an experiment trained on one text file of the data folder."""

    def data(data_dir: Path, work: Path) -> tuple[list[str], list[Job]]:
        return [f"data.path={corpus_file(data_dir, name)}"], []

    return data


def poem_split(data_dir: Path, work: Path) -> tuple[list[str], list[Job]]:
    """The seeded split of the poems (kept when already built, so reused runs keep their test poems)."""
    split = work / "split"
    if (split / "split.json").is_file():
        return [f"data.path={split}"], []
    source = corpus_file(data_dir, "modern_poems.jsonl")
    build = [*DIFFLM, "data", "build-poems", str(source), str(split), "--seed", "0"]
    return [f"data.path={split}"], [Job(build, work / "build-poems.log")]


def qwen3_text(data_dir: Path, work: Path) -> tuple[list[str], list[Job]]:
    """WikiText-2 (test split) with the BPE tokenizer of the Qwen3 examples (trained once into WORK)."""
    corpus = corpus_file(data_dir, "wikitext2_test.txt")
    corpus_file(data_dir, "paws_pairs.jsonl")  # the tokenizer's second corpus
    overrides = [f"data.path={corpus}", f"data.tokenizer={work / 'tokenizer'}"]
    if (work / "tokenizer" / "tokenizer.json").is_file():
        return overrides, []
    script = str(REPO / "examples" / "bpe_tokenizer.py")
    return overrides, [Job([sys.executable, script, str(work), str(data_dir)], work / "tokenizer.log")]


# ----------------------------------------------------------------------------------------------
# Evaluations: from the run folders to the jobs that write --out, stage by stage
# ----------------------------------------------------------------------------------------------

Stages = list[list[Job]]  # stages run in order; the jobs of a stage side by side


def benchmark(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / script), *args]


def options(**named: object) -> list[str]:
    """`--split-dir X` from split_dir=X, in order."""
    return [arg for key, value in named.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def eval_shakespeare(preset: Preset, runs: dict[str, Path], out: Path) -> Stages:
    """benchmarks/shakespeare_core.py over the runs, the first (the AR run) judging."""
    named = [arg for name, path in runs.items() for arg in ("--run", f"{name.removeprefix('ref_')}={path}")]
    flags = [*options(judge=next(iter(runs.values())), out=out), *preset.evaluation[0].split()]
    return [[Job(benchmark("shakespeare_core.py", *named, *flags), out / "logs" / "eval.log")]]


def eval_poems(preset: Preset, runs: dict[str, Path], out: Path) -> Stages:
    """`difflm eval poem-completion`: the table into --out, the rescored AR row into --out/rescored."""
    split = run_config(runs["poems_ar"])["data"]["path"]  # the split the runs were trained on
    models = options(diffusion=runs["poems_prefix_diffusion"], ar=runs["poems_ar"], split_dir=split)
    base = [*DIFFLM, "eval", "poem-completion", *models]
    plain, rescored = preset.evaluation
    table = Job([*base, *options(out_dir=out), *plain.split()], out / "logs" / "eval.log")
    rows = Job(
        [*base, *options(out_dir=out / "rescored"), *rescored.split()], out / "logs" / "eval_rescored.log"
    )
    return [[table, rows]]


def eval_forcing(preset: Preset, runs: dict[str, Path], out: Path) -> Stages:
    """benchmarks/forcing_vs_teacher.py: the TF run judges both (DF: its last run, the last leg)."""
    files = options(plot=out / "forcing_vs_teacher.png", json=out / "results.json", table=out / "table.md")
    flags = [*options(tf=runs["tf"], df=list(runs.values())[-1]), *files, *preset.evaluation[0].split()]
    return [[Job(benchmark("forcing_vs_teacher.py", *flags), out / "logs" / "eval.log")]]


def eval_a2d(preset: Preset, runs: dict[str, Path], out: Path) -> Stages:
    """benchmarks/qwen3_ar_to_diffusion.py over the work folder the runs are in."""
    flags = [str(runs["ar"].parent), *options(results=out), *preset.evaluation[0].split()]
    return [[Job(benchmark("qwen3_ar_to_diffusion.py", *flags), out / "logs" / "eval.log")]]


def eval_sgdd(preset: Preset, runs: dict[str, Path], out: Path) -> Stages:
    """benchmarks/sgdd.py once per run side by side, then --merge into one table."""
    parts = {name: out / "parts" / name for name in runs}
    each = [
        Job(
            benchmark(
                "sgdd.py", "--run", f"{name}={path}", "--out", str(parts[name]), *preset.evaluation[0].split()
            ),
            out / "logs" / f"eval_{name}.log",
        )
        for name, path in runs.items()
    ]
    merge = [arg for part in parts.values() for arg in ("--merge", str(part))]
    return [each, [Job(benchmark("sgdd.py", *merge, "--out", str(out)), out / "logs" / "merge.log")]]


@dataclass(frozen=True)
class Experiment:
    """How an experiment finds its data and evaluates its runs."""

    results: str  # its folder under docs/results
    data: Callable[[Path, Path], tuple[list[str], list[Job]]]  # (data dir, work dir) -> overrides, jobs
    evaluate: Callable[[Preset, dict[str, Path], Path], Stages]


EXPERIMENTS: dict[str, Experiment] = {
    "shakespeare": Experiment("shakespeare_core", text_corpus("tinyshakespeare.txt"), eval_shakespeare),
    "shakespeare_long": Experiment("shakespeare_core/long", text_corpus("tinyshakespeare.txt"), eval_shakespeare),
    "poems": Experiment("poems", poem_split, eval_poems),
    "forcing": Experiment("forcing", text_corpus("tinyshakespeare.txt"), eval_forcing),
    "forcing_long": Experiment("forcing_ablation/legs", text_corpus("tinyshakespeare.txt"), eval_forcing),
    "sgdd": Experiment("sgdd", text_corpus("sentences_en.txt"), eval_sgdd),
    "a2d": Experiment("qwen3_ar_to_diffusion", qwen3_text, eval_a2d),
}


# ----------------------------------------------------------------------------------------------
# Training: reuse, resume or train each run
# ----------------------------------------------------------------------------------------------

DRY_RUN = (  # fp32: bf16 autocast on a CPU without bf16 units is ~10x slower and checks nothing more here
    "train.max_steps=2 train.batch_size=2 train.device=cpu train.precision=fp32 train.eval_every=0 "
    "train.eval_batches=1"
)


def run_config(folder: Path) -> dict:
    """The run config stored in a run folder's latest checkpoint."""
    latest = (folder / "checkpoints" / "latest").read_text().strip()
    return json.loads((folder / "checkpoints" / latest / "difflm.json").read_text())


def is_finished(folder: Path, steps: int) -> bool:
    """The folder holds a complete checkpoint of the run's last step (its manifest is written last)."""
    return (folder / "checkpoints" / f"step-{steps}" / "manifest.json").is_file()


def train_job(preset: Preset, run: Run, data: list[str], folder: Path, extra: str = "") -> Job:
    """`difflm train` of one run into `folder`; resumes when the folder holds an earlier checkpoint."""
    resume = ("train.resume=latest",) if (folder / "checkpoints" / "latest").is_file() else ()
    overrides = [
        *preset.model.split(),
        f"train.batch_size={preset.batch_size}",
        f"train.precision={preset.precision}",
        f"train.device={preset.device}",
        *preset.train.split(),
        *data,
        *run.overrides.split(),
        f"train.max_steps={run.schedule or run.steps}",
        *([f"train.stop_at_step={run.steps}"] if run.schedule else []),
        *([f"train.init_from={init_path(run, folder.parent)}"] if run.init_from else []),
        *([f"model.init_from={converted_path(run.convert, folder.parent)}"] if run.convert else []),
        "train.progress=false",
        f"train.output_dir={folder}",
        *resume,
        *extra.split(),
    ]
    return Job([*DIFFLM, "train", run.recipe, *overrides], folder.parent / f"{run.name}.log")


def init_path(run: Run, work: Path) -> Path:
    """`run.init_from` under the work dir: RUN/step-N is that checkpoint, RUN alone its latest."""
    source, _, step = run.init_from.partition("/")
    return work / source / "checkpoints" / step if step else work / source


def converted_path(source: str, work: Path) -> Path:
    return work / f"{source}_converted"


def convert_jobs(runs: list[Run], work: Path) -> list[Job]:
    """`difflm convert` of each AR run a later run starts from (its best checkpoint, else its last)."""
    jobs = []
    for source in sorted({run.convert for run in runs if run.convert}):
        checkpoints, dst = work / source / "checkpoints", converted_path(source, work)
        if dst.is_dir():
            continue
        best = checkpoints / "best" if (checkpoints / "best").is_dir() else checkpoints / (
            (checkpoints / "latest").read_text().strip()
        )
        command = [*DIFFLM, "convert", "--from", "qwen3", str(best), str(dst)]
        jobs.append(Job(command, work / f"{source}_convert.log"))
    return jobs


def training_stages(runs: list[Run]) -> list[list[Run]]:
    """Runs in order of what they start from: a run that starts from another run's checkpoint
    (init_from, convert) trains in a later stage than that run; a source not in `runs` is done."""
    names = {run.name for run in runs}
    stages, done, left = [], set(), list(runs)
    while left:
        sources = {run.name: {run.init_from.partition("/")[0], run.convert} & names for run in left}
        stage = [run for run in left if sources[run.name] <= done]
        if not stage:
            raise SystemExit(f"reproduce: these runs start from each other in a cycle: {sorted(sources)}")
        stages.append(stage)
        done |= {run.name for run in stage}
        left = [run for run in left if run not in stage]
    return stages


def execute(job: Job, threads: int) -> int:
    """Run one job to completion (stderr, and stdout unless kept apart, appended to its log)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    job.log.parent.mkdir(parents=True, exist_ok=True)
    if job.stdout is not None:
        job.stdout.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log, open(job.stdout or os.devnull, "w") as out:
        return subprocess.run(job.argv, stdout=out if job.stdout else log, stderr=log, env=env).returncode


def run_stage(jobs: list[Job], threads: int, commands: list[str], side_by_side: int = SIDE_BY_SIDE) -> None:
    """Run jobs `side_by_side` at a time; stop with the log's tail when one fails."""
    for job in jobs:
        print(f"[reproduce] {job.command}\n[reproduce]   log: {job.log}", flush=True)
        commands.append(job.command)
    with ThreadPoolExecutor(side_by_side) as pool:
        codes = list(pool.map(lambda job: execute(job, threads), jobs))
    for job, code in zip(jobs, codes, strict=True):
        if code != 0:
            tail = "\n".join(job.log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
            raise SystemExit(f"reproduce: exit {code}: {job.command}\n--- end of {job.log}:\n{tail}")


# ----------------------------------------------------------------------------------------------
# Outputs: curves, samples, commands, wall time and hardware
# ----------------------------------------------------------------------------------------------


def val_curve(folder: Path) -> list[tuple[int, float]]:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]


def hardware() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def sample_jobs(preset: Preset, folders: dict[str, Path], out: Path) -> list[Job]:
    return [
        Job(
            [*DIFFLM, "sample", str(folders[run.name]), *run.sample.split()],
            out / "logs" / f"sample_{run.name}.log",
            stdout=out / "samples" / f"{run.name}.txt",
        )
        for run in preset.runs
        if run.sample
    ]


def write_samples(jobs: list[Job], out: Path) -> None:
    blocks = [
        f"## {job.stdout.stem}\n\n`{job.command}`\n\n```\n{job.stdout.read_text().strip()}\n```\n"
        for job in jobs
        if job.stdout
    ]
    (out / "samples.md").write_text("\n".join(blocks), encoding="utf-8")


def plot_curves(curves: dict[str, list], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        if curve:
            ax.plot(*zip(*curve, strict=True), marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (the trainer's, nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_summary(
    out: Path, name: str, scale: str, preset: Preset, runs: dict, commands: list[str], seconds: float
) -> None:
    """reproduce.json, command.txt and train_curves.png (a benchmark's own command.txt is replaced:
    it is one of these commands)."""
    summary = {
        "experiment": name,
        "scale": scale,
        "wall_seconds": round(seconds, 1),
        "hardware": hardware(),
        "preset": asdict(preset),
        "runs": runs,
        "commands": commands,
    }
    (out / "reproduce.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "command.txt").write_text("\n".join(commands) + "\n", encoding="utf-8")
    curves = {run: info["curve"] for run, info in runs.items()}
    plot_curves(curves, f"{name}, {scale} scale: validation loss", out / "train_curves.png")


# ----------------------------------------------------------------------------------------------
# One experiment, start to end
# ----------------------------------------------------------------------------------------------


def corpora(name: str, data_dir: Path, work: Path, synthetic: int | None) -> tuple[list[str], list[Job]]:
    """Data overrides and preparing jobs; `synthetic` sentences: write stand-in corpora instead."""
    folder = synthetic_corpora(work / "data", synthetic) if synthetic else data_dir
    data, jobs = EXPERIMENTS[name].data(folder, work)
    return [*data, f"data.cache_dir={work / 'cache'}"], jobs


def dry_run(name: str, scale: str, work: Path) -> None:
    """Build every model of the preset and train it 2 steps on the CPU, on synthetic corpora."""
    preset = PRESETS[name][scale]
    data, prepare = corpora(name, work, work, synthetic=600)  # > the SGDD holdout of 500
    commands: list[str] = []
    run_stage(prepare, 1, commands)
    folders = {run.name: work / "dry_run" / run.name for run in preset.runs}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)  # our own scratch run from an earlier dry run
    runs = [dataclasses.replace(run, init_from=run.init_from.partition("/")[0]) for run in preset.runs]
    for source in {run.convert for run in preset.runs if run.convert}:
        shutil.rmtree(converted_path(source, work / "dry_run"), ignore_errors=True)
    for stage in training_stages(runs):  # a run started from another starts from its last step here
        run_stage(convert_jobs(stage, work / "dry_run"), 1, commands)
        run_stage([train_job(preset, run, data, folders[run.name], DRY_RUN) for run in stage], 1, commands)
    for run in preset.runs:
        print(
            f"[reproduce] dry run {name}/{run.name}: 2 steps, val loss {val_curve(folders[run.name])[-1][1]:.4f}"
        )


def reproduce(name: str, scale: str, data_dir: Path, work: Path, out: Path) -> None:
    """Train (or reuse) every run of the preset, evaluate, and write the results into `out`."""
    start = time.perf_counter()
    preset = PRESETS[name][scale]
    data, prepare = corpora(name, data_dir, work, synthetic=80 if scale == "smoke" else None)
    commands: list[str] = []
    run_stage(prepare, preset.threads, commands)
    folders = {run.name: work / run.name for run in preset.runs}
    todo = [run for run in preset.runs if not is_finished(folders[run.name], run.steps)]
    for run in preset.runs:
        if run not in todo:
            print(f"[reproduce] reuse {folders[run.name]}: it holds step-{run.steps}", flush=True)
            commands.append(f"# reused {folders[run.name]} (it holds step-{run.steps})")
    for stage in training_stages(todo):
        run_stage(convert_jobs(stage, work), 1, commands)
        run_stage(
            [train_job(preset, run, data, folders[run.name]) for run in stage],
            preset.threads,
            commands,
            preset.side_by_side,
        )
    out.mkdir(parents=True, exist_ok=True)
    for stage in EXPERIMENTS[name].evaluate(preset, folders, out):
        run_stage(stage, preset.threads, commands, preset.side_by_side)
    samples = sample_jobs(preset, folders, out)
    if samples:
        run_stage(samples, preset.threads, commands, preset.side_by_side)
        write_samples(samples, out)
    runs = {
        run.name: {
            "folder": str(folders[run.name]),
            "reused": run not in todo,
            "steps": run.steps,
            "curve": val_curve(folders[run.name]),
        }
        for run in preset.runs
    }
    write_summary(out, name, scale, preset, runs, commands, time.perf_counter() - start)
    print(f"[reproduce] {name} ({scale}): results in {out}, {time.perf_counter() - start:.0f} s", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--scale", choices=SCALES, required=True)
    p.add_argument(
        "--data-dir", type=Path, default=None, help="the corpora (default $DIFFLM_DATA_DIR or ../shared/data)"
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="run folders (default runs/reproduce/EXPERIMENT-SCALE; with 'all', DIR/EXPERIMENT)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results (default docs/results/NAME, docs/results/NAME/gpu for gpu, WORK/results for "
        "smoke; with 'all', DIR/EXPERIMENT)",
    )
    p.add_argument("--dry-run", action="store_true", help="build every model, train 2 steps on the CPU, stop")
    return p.parse_args(argv)


def folders_for(name: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """The work and results folders of one experiment (absolute: the jobs run from any directory)."""
    each = args.experiment == "all"
    work = args.work_dir / name if each and args.work_dir else args.work_dir
    work = (work or REPO / "runs" / "reproduce" / f"{name}-{args.scale}").resolve()
    out = args.out / name if each and args.out else args.out
    if out is None:
        results = REPO / "docs" / "results" / EXPERIMENTS[name].results
        out = {"smoke": work / "results", "cpu": results, "gpu": results / "gpu"}[args.scale]
    return work, out.resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = (args.data_dir or default_data_dir()).resolve()
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        work, out = folders_for(name, args)
        if args.dry_run:
            dry_run(name, args.scale, work)
        else:
            reproduce(name, args.scale, data_dir, work, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
