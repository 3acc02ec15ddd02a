"""The presets of benchmarks/reproduce.py: every size, step count and evaluation flag of every
experiment at every scale, as data (`PRESETS[experiment][scale]`), so the script holds only how to
run them. Flags and overrides are space-separated strings, as they are typed on a command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCALES = ("smoke", "cpu", "gpu")
SIDE_BY_SIDE = 2  # processes at a time: one per core on the 2-core CPU


@dataclass(frozen=True)
class Run:
    """One `difflm train` run of an experiment."""

    name: str  # its folder under the work dir (and its name in the tables)
    recipe: str  # a shipped recipe name
    steps: int  # train.max_steps; a folder holding checkpoints/step-{steps} is reused
    overrides: str = ""  # what sets this run apart from the others of the experiment
    sample: str = ""  # `difflm sample` flags for samples.md (empty: the evaluation writes the samples)
    schedule: int | None = None  # train.max_steps of the lr schedule when the run stops before its end
    init_from: str = ""  # "RUN/step-N": start from that checkpoint of another run (trained first)
    convert: str = ""  # "RUN": start from that causal Qwen3 run's best checkpoint after `difflm convert`


@dataclass(frozen=True)
class Preset:
    """Everything one experiment trains and evaluates with at one scale (flags and overrides as
    space-separated strings, as they are typed on a command line)."""

    runs: tuple[Run, ...]
    model: str  # model size and sequence length overrides every run shares (empty: the recipes')
    batch_size: int
    precision: str  # fp32 | bf16 (train.precision)
    train: str  # the other shared train overrides: lr schedule, eval and save cadence
    evaluation: tuple[str, ...]  # flags of each evaluation command (see the experiment's `evaluate`)
    device: str = "cpu"  # train.device
    threads: int = 1  # OMP threads per process
    side_by_side: int = SIDE_BY_SIDE  # processes at a time


SMOKE_TRAIN = "train.warmup_steps=1 train.eval_every=0 train.eval_batches=1 train.log_every=1"
TINY = "model.n_layer=1 model.n_head=2 model.n_embd=32 model.dropout=0.0"
GPU_TRAIN = (
    "train.warmup_steps=100 train.eval_every=250 train.eval_batches=20 train.save_every=500 train.keep_last=1"
)
GPU = {  # one H200: bf16; small models leave most of it idle, so four runs share it
    "precision": "bf16",
    "device": "cuda",
    "threads": 2,
    "side_by_side": 4,
}
NANO_CHAR = "model.n_layer=6 model.n_head=6 model.n_embd=384 model.dropout=0.1 data.block_size=256"
CPU_CHAR = "model.n_layer=4 model.n_head=4 model.n_embd=128 model.dropout=0.0 data.block_size=128"
SHAKESPEARE_SMOKE_EVAL = ("--prompts 2 --prompt-length 8 --gen-length 8 --samples 1 --max-batches 1",)
SHAKESPEARE_CPU_EVAL = ("--prompts 16 --prompt-length 32 --gen-length 96 --samples 4",)
SHAKESPEARE_GPU_EVAL = (
    "--prompts 16 --prompt-length 64 --gen-length 128 --samples 2 --max-batches 20 --device cuda",
)
POEM_PROMPT = "我想在春天的早晨醒来/"
ALL_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6"


def shakespeare_runs(steps: int) -> tuple[Run, ...]:
    """The same transformer four ways (run names as in docs/results/shakespeare_core)."""
    return (
        Run("ref_ar", "shakespeare_char_ar", steps),
        Run("ref_mdm", "shakespeare_char", steps),
        Run("ref_bd3_4", "shakespeare_char", steps, "diffusion.block_length=4"),
        Run("ref_bd3_16", "shakespeare_char", steps, "diffusion.block_length=16"),
    )


def long_runs(ar: int, mdm: int, from_ar: int, bd3_4: int, bd3_16: int, init: str) -> tuple[Run, ...]:
    """The AR model to its plateau, masked diffusion from scratch for as long, and diffusion started
    from the AR checkpoint `init` ("ar/best") with Dream's shifted head: full masked diffusion, and
    BD3 K=4 / K=16 with a clipped t (docs/results/shakespeare_core/long). The AR run judges."""
    shifted = "model.logits_shift=1 train.lr=1e-3 train.min_lr=1e-4"
    clipped = "diffusion.t_eps=0.3 diffusion.t_max=0.8"
    return (
        Run("ar", "shakespeare_char_ar", ar),
        Run("mdm", "shakespeare_char", mdm),
        Run("mdm_from_ar", "shakespeare_char", from_ar, shifted, init_from=init),
        Run(
            "bd3_4_from_ar",
            "shakespeare_char",
            bd3_4,
            f"diffusion.block_length=4 {clipped} {shifted}",
            init_from=init,
        ),
        Run(
            "bd3_16_from_ar",
            "shakespeare_char",
            bd3_16,
            f"diffusion.block_length=16 {clipped} {shifted}",
            init_from=init,
        ),
    )


Steps = tuple[int, int | None]  # (the step a run stops at, the lr schedule's max_steps or None)


def poem_runs(
    ar: Steps, diffusion: Steps, init: int, scratch: Steps | None, gen: int, denoise: int
) -> tuple[Run, ...]:
    """The AR baseline; prefix diffusion started from its step `init` (AR -> diffusion: from scratch
    a masked LM on these poems stays at the unigram level for hundreds of steps); optionally the
    same diffusion run from scratch, for its curve. Samples from the seed's prompt (top-k 50, top-p 0.95)."""
    sample = f"--prompt {POEM_PROMPT} --gen-length {gen} --temperature 1.0 --top-k 50 --top-p 0.95 --seed 0"
    runs = [
        Run("poems_ar", "poems_ar", ar[0], "train.keep_last=0", sample=sample, schedule=ar[1]),
        Run(
            "poems_prefix_diffusion",
            "poems_prefix_diffusion",
            diffusion[0],
            sample=f"{sample} --steps {denoise} --mode keep",
            schedule=diffusion[1],
            init_from=f"poems_ar/step-{init}",
        ),
    ]
    if scratch:
        runs.append(
            Run("poems_prefix_diffusion_scratch", "poems_prefix_diffusion", scratch[0], schedule=scratch[1])
        )
    return tuple(runs)


def poem_eval(n: int, n_rescored: int, ratios: str, denoise: int, device: str) -> tuple[str, str]:
    """The table on n test poems (AR left to right), then the rescored AR row (3 candidates) on fewer."""
    common = f"--ratios {ratios} --seed 0 --denoise-steps {denoise} --device {device}"
    return (
        f"{common} --n-poems {n} --candidates 0 --batch-size {min(n, 64)}",
        f"{common} --n-poems {n_rescored} --candidates 3 --batch-size {n_rescored}",
    )


def forcing_runs(steps: int, gen: int, horizon: int, ddim: int) -> tuple[Run, ...]:
    """Teacher forcing and Diffusion Forcing on the same DFGPT (only the flag differs)."""
    prompt = f"--prompt ROMEO: --gen-length {gen} --seed 0"
    return (
        Run("tf", "shakespeare_char_tf", steps, sample=f"{prompt} --temperature 0.8"),
        Run(
            "df",
            "shakespeare_char_df",
            steps,
            sample=f"{prompt} --schedule pyramid --horizon {horizon} --steps {ddim}",
        ),
    )


def forcing_legs(
    tf: int, legs: tuple[tuple[int, str], ...], gen: int, horizon: int, ddim: int
) -> tuple[Run, ...]:
    """Teacher forcing, and Diffusion Forcing trained in legs: each leg starts from the last weights
    of the one before (`train.init_from`) with its own peak lr (docs/results/forcing_ablation). The
    last leg is evaluated against TF."""
    tf_run, df_run = forcing_runs(tf, gen, horizon, ddim)
    runs = [tf_run]
    for i, (steps, lr) in enumerate(legs):
        name = "df" if i == 0 else f"df_leg{i + 1}"
        overrides = f"train.lr={lr} train.min_lr={float(lr) / 10:g}"
        init = runs[-1].name if i else ""
        last = i == len(legs) - 1
        runs.append(
            dataclasses.replace(
                df_run,
                name=name,
                steps=steps,
                overrides=overrides,
                init_from=init,
                sample=df_run.sample if last else "",
            )
        )
    return tuple(runs)


def forcing_eval(
    batches: int, prompts: int, prompt_length: int, gen: int, horizon: int, ddim: int
) -> tuple[str]:
    return (
        f"--max-batches {batches} --continuations {prompts} --prompt-length {prompt_length} --gen-length {gen} "
        f"--sampling-timesteps {ddim} --horizon {horizon} --schedule pyramid",
    )


FORCING_GPU_EVAL = (f"{forcing_eval(20, 16, 64, 256, 16, 20)[0]} --device cuda",)

SGDD_SMOKE = "model.block_size=16 system.holdout=8 system.sample_steps=2 system.encode_batch_size=32"
SGDD_SCRATCH_SMOKE = (
    "model.n_layer=1 model.n_head=2 model.n_embd=32 model.ffn_hidden=64 model.embedding_init=random"
)

A2D_DIFFUSION = (  # examples/qwen3_ar_to_diffusion.sh's diffusion runs (the AR run keeps its recipe's)
    "train.lr=1e-3 train.min_lr=1e-4 train.warmup_steps=50 train.eval_every=100 train.eval_batches=8 "
    "train.save_every=100 train.keep_last=1"
)


def a2d_runs(ar: int, diffusion: int) -> tuple[Run, ...]:
    """A causal Qwen3, then Qwen3-LLaDA three ways: from its converted weights, from random init, and
    from its converted weights under block attention (run names as benchmarks/qwen3_ar_to_diffusion.py reads)."""
    block = f"{A2D_DIFFUSION} system.block_attention=true"
    return (
        Run("ar", "qwen3_ar_pretrain", ar),
        Run("from_ar", "qwen3_llada_pretrain", diffusion, A2D_DIFFUSION, convert="ar"),
        Run("scratch", "qwen3_llada_pretrain", diffusion, A2D_DIFFUSION),
        Run("from_ar_block", "qwen3_llada_pretrain", diffusion, block, convert="ar"),
    )


A2D_SMOKE_MODEL = (
    "model.hidden_size=32 model.intermediate_size=64 model.num_hidden_layers=1 model.num_attention_heads=2 "
    "model.num_key_value_heads=1 model.head_dim=16 data.block_size=32"
)

FORCING_LONG_TRAIN = (
    "train.lr=2e-3 train.min_lr=2e-4 train.warmup_steps=50 train.eval_every=250 train.eval_batches=10 "
    "train.save_every=250 train.keep_last=0"
)

PRESETS: dict[str, dict[str, Preset]] = {
    "shakespeare": {
        "smoke": Preset(
            runs=shakespeare_runs(3),
            model=f"{TINY} data.block_size=32",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=SHAKESPEARE_SMOKE_EVAL,
        ),
        "cpu": Preset(  # docs/results/shakespeare_core: 1000 steps of 16 x 128 chars, 11-23 min per run
            runs=shakespeare_runs(1000),
            model=CPU_CHAR,
            batch_size=16,
            precision="fp32",
            train="train.warmup_steps=100 train.lr=2e-3 train.min_lr=2e-4 train.eval_every=100 "
            "train.eval_batches=10 train.save_every=100 train.keep_last=0",
            evaluation=SHAKESPEARE_CPU_EVAL,
        ),
        "gpu": Preset(  # nanoGPT's shakespeare_char size; 1500 steps of 64 x 256 chars (~12 epochs)
            runs=shakespeare_runs(1500),
            model=NANO_CHAR,
            batch_size=64,
            **GPU,
            train=f"{GPU_TRAIN} train.lr=1e-3 train.min_lr=1e-4",
            evaluation=SHAKESPEARE_GPU_EVAL,
        ),
    },
    "poems": {
        "smoke": Preset(
            runs=poem_runs((3, None), (3, None), init=3, scratch=None, gen=8, denoise=2),
            model=f"{TINY} data.block_size=64",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=poem_eval(4, 2, "0.2,0.5", 2, "cpu"),
        ),
        "cpu": Preset(  # the recipes' 4 x 256 transformer; AR stopped at its plateau (step 700 of 1100)
            runs=poem_runs((700, 1100), (400, 600), init=400, scratch=(600, 1300), gen=64, denoise=10),
            model="",
            batch_size=32,
            precision="fp32",
            train="train.log_every=20 train.eval_every=100 train.eval_batches=11 train.save_every=100 "
            "train.keep_last=0 train.warmup_steps=50",
            evaluation=poem_eval(344, 20, ALL_RATIOS, 10, "cpu"),  # 344: the whole test split
        ),
        "gpu": Preset(
            runs=poem_runs((1100, None), (1300, None), init=500, scratch=None, gen=64, denoise=10),
            model="model.n_layer=6 model.n_head=6 model.n_embd=384",
            batch_size=64,
            **GPU,
            train="train.warmup_steps=50 train.eval_every=100 train.eval_batches=11 train.save_every=100 "
            "train.keep_last=1",
            evaluation=poem_eval(344, 100, ALL_RATIOS, 10, "cuda"),  # 344: the whole test split
        ),
    },
    "forcing": {
        "smoke": Preset(
            runs=forcing_runs(3, gen=8, horizon=4, ddim=2),
            model=f"{TINY} data.block_size=32",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=forcing_eval(1, 2, 8, 8, 4, 2),
        ),
        "cpu": Preset(  # examples/forcing_vs_teacher.sh's CPU size, trained 2000 steps instead of 300
            runs=forcing_runs(2000, gen=200, horizon=16, ddim=20),
            model=CPU_CHAR,
            batch_size=32,
            precision="fp32",
            train="train.warmup_steps=30 train.eval_every=100 train.eval_batches=4 train.save_every=100 "
            "train.keep_last=0 train.log_every=10",
            evaluation=forcing_eval(20, 8, 64, 256, 16, 20),
        ),
        "gpu": Preset(  # the recipes' nanoGPT size (6 x 384, block 256, dropout 0.2), 2000 of their 5000 steps
            runs=forcing_runs(2000, gen=200, horizon=16, ddim=20),
            model="",
            batch_size=64,
            **GPU,
            train=GPU_TRAIN,
            evaluation=FORCING_GPU_EVAL,
        ),
    },
    "sgdd": {
        "smoke": Preset(
            runs=(
                Run("sgdd_minilm", "sgdd_phase1_minilm", 3, SGDD_SMOKE),
                Run("sgdd_scratch", "sgdd_phase1", 3, f"{SGDD_SMOKE} {SGDD_SCRATCH_SMOKE}"),
            ),
            model="",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=("--cfg 0,2 --grid 1:0,2:1,2:0:1 --examples 4 --batch-size 4 --latency-sentences 1",),
        ),
        "cpu": Preset(  # docs/results/sgdd (minilm: 87 min alone on 2 threads; here one thread each, side by side)
            runs=(
                Run("sgdd_minilm", "sgdd_phase1_minilm", 3600),
                Run(
                    "sgdd_scratch",
                    "sgdd_phase1",
                    5000,
                    "model.block_size=32 train.eval_every=250 train.save_every=250",
                ),
            ),
            model="",
            batch_size=64,
            precision="fp32",
            train="",
            evaluation=(
                "--cfg 0 --grid 1:0,4:0,4:0:12:3:0,4:0:12:3:0.001 --examples 500 --batch-size 50 --latency-sentences 30",
            ),
        ),
        "gpu": Preset(
            runs=(
                Run("sgdd_minilm", "sgdd_phase1_minilm", 2000, "train.eval_every=250 train.save_every=500"),
                Run(
                    "sgdd_scratch",
                    "sgdd_phase1",
                    4000,
                    "model.block_size=32 train.eval_every=500 train.save_every=1000",
                ),
            ),
            model="",
            batch_size=128,
            **GPU,
            train="train.keep_last=1",
            evaluation=("--cfg 0,2 --grid 1:0,4:0,4:0:12 --examples 200 --batch-size 100 --latency-sentences 10",),
        ),
    },
    "shakespeare_long": {
        "smoke": Preset(
            runs=long_runs(3, 3, 3, 3, 3, init="ar"),
            model=f"{TINY} data.block_size=32",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=SHAKESPEARE_SMOKE_EVAL,
        ),
        "cpu": Preset(  # docs/results/shakespeare_core/long: 7-58 min per run, one thread each
            runs=long_runs(4000, 4000, 4000, 4000, 2000, init="ar/best"),
            model=CPU_CHAR,
            batch_size=16,
            precision="fp32",
            train="train.warmup_steps=100 train.lr=2e-3 train.min_lr=2e-4 train.eval_every=250 "
            "train.eval_batches=20 train.save_every=250 train.keep_best=true",
            evaluation=SHAKESPEARE_CPU_EVAL,
        ),
        "gpu": Preset(
            runs=long_runs(4000, 4000, 1000, 2000, 2000, init="ar/best"),
            model=NANO_CHAR,
            batch_size=64,
            **GPU,
            train=f"{GPU_TRAIN} train.lr=1e-3 train.min_lr=1e-4 train.keep_best=true",
            evaluation=SHAKESPEARE_GPU_EVAL,
        ),
    },
    "forcing_long": {
        "smoke": Preset(
            runs=forcing_legs(3, ((3, "2e-3"), (3, "1e-3")), gen=8, horizon=4, ddim=2),
            model=f"{TINY} data.block_size=32",
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=forcing_eval(1, 2, 8, 8, 4, 2),
        ),
        "cpu": Preset(  # docs/results/forcing_ablation: 4 legs of 2000 steps, 98 min of DF training in all
            runs=forcing_legs(
                1000, ((2000, "2e-3"), (2000, "1e-3"), (2000, "7e-4"), (2000, "5e-4")), 200, 16, 20
            ),
            model=CPU_CHAR,
            batch_size=32,
            precision="fp32",
            train=FORCING_LONG_TRAIN,
            evaluation=forcing_eval(20, 8, 64, 256, 16, 20),
        ),
        "gpu": Preset(
            runs=forcing_legs(2000, ((2000, "1e-3"), (2000, "5e-4")), 200, 16, 20),
            model="",
            batch_size=64,
            **GPU,
            train=GPU_TRAIN,
            evaluation=FORCING_GPU_EVAL,
        ),
    },
    "a2d": {
        "smoke": Preset(
            runs=a2d_runs(3, 3),
            model=A2D_SMOKE_MODEL,
            batch_size=4,
            precision="fp32",
            train=SMOKE_TRAIN,
            evaluation=("--samples 1 --gen-length 8",),
        ),
        "cpu": Preset(  # examples/qwen3_ar_to_diffusion.sh: the recipes' 4 x 128 Qwen3, AR best at step ~1000
            runs=a2d_runs(1500, 1000),
            model="",
            batch_size=16,
            precision="fp32",
            train="",
            evaluation=("--samples 4",),
        ),
        "gpu": Preset(
            runs=a2d_runs(1500, 1000),
            model="model.hidden_size=384 model.intermediate_size=1152 model.num_hidden_layers=6 "
            "model.num_attention_heads=6 model.num_key_value_heads=2 model.head_dim=64",
            batch_size=64,
            **GPU,
            train="",
            evaluation=("--samples 4 --device cuda",),
        ),
    },
}
