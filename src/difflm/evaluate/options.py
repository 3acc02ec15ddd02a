"""`EvalOptions`: what `difflm eval` asks of a checkpoint, as a system's evaluator reads it, and
`HarnessOptions` for `eval --tasks` (lm-evaluation-harness); the command's flags are made from
these fields (commands/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass

from difflm.fields import opt

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class EvalOptions:
    """The settings of `difflm eval` shared by every system's evaluator (one flag per field)."""

    samples: int = opt(4, "Monte-Carlo draws of t per sequence (ELBO)")
    batch_size: int = opt(32, "sequences per forward")
    max_batches: int | None = opt(None, "evaluate only the first N val batches")
    seed: int = opt(0, "seed of the Monte-Carlo draws")
    block_length: int | None = opt(
        None,
        "ELBO of block diffusion with blocks of K tokens (default: the checkpoint's diffusion.block_length)",
    )
    left_to_right: bool = opt(
        False,
        "masked diffusion: also the exact NLL of decoding one token a step, left to right in each block "
        "(as sampled with --remasking left_to_right; K forwards per batch)",
    )
    any_order: bool = opt(
        False,
        "block diffusion (K <= 8): also the exact NLL of revealing each block one token a step in a "
        "uniformly random order, the likelihood the ELBO bounds (2^K forwards per batch)",
    )
    device: str = opt("cpu", "the device to evaluate on (e.g. cpu, cuda)")
    split: str = opt(
        "val",
        "sgdd: score the held-out examples, or as many training ones (a memorisation check)",
        ("val", "train"),
    )
    data: str | None = opt(None, "sgdd: score this file instead (one sentence a line, or JSONL / TSV pairs)")
    cfg_scale: float | None = opt(
        None, "sgdd: guidance weight of the guided rows (default: the run's system.cfg_scale; CFG 0 is always scored)"
    )
    best_of: int = opt(1, "sgdd: decode N candidates, keep the one the encoder finds closest")
    rounds: int = opt(0, "sgdd: correction rounds (re-mask the least likely tokens, keep if closer)")
    search: int = opt(0, "sgdd: edit-search rounds at most (best-first over single-token edits the decoder proposes)")
    search_patience: int | None = opt(
        None, "sgdd: search rounds without a closer text before a sentence stops (default 3; 1: greedy)"
    )
    fluency: float = opt(
        0.0,
        "sgdd: after --search, choose among the 32 closest texts by cosine + W * the decoder's "
        "pseudo-log-likelihood (nats; 0.001 was chosen on training sentences; 0: cosine only)",
    )
    precision: str = opt(
        "fp32",
        "autocast for the model's forwards (bf16: ~2.5x faster on CPUs with AVX-512 BF16)",
        PRECISIONS,
    )
    int8: bool = opt(
        False,
        "sgdd: the decoder's linear layers in int8 (dynamic quantization, CPU only): 1.15-1.29x faster "
        "batch-1 decoding on one thread here, a slightly different text in some sentences "
        "(docs/results/sgdd/int8.md)",
    )
    json: bool = opt(False, "print the metrics as one JSON object")
    no_verify: bool = opt(False, "skip the sha256 check of the checkpoint's files (sizes only)")
    judge: str | None = opt(None, "teacher_forcing checkpoint scoring generations (gen_ppl)")
    continuations: int = opt(8, "held-out prompts continued (forcing)")
    gen_length: int = opt(256, "tokens generated per continuation (forcing)")


@dataclass
class HarnessOptions:
    """`difflm eval --tasks`: lm-evaluation-harness settings (needs difflm[lmeval])."""

    tasks: str | None = opt(None, "comma-separated lm-eval tasks (e.g. gsm8k) instead of the val metrics")
    model_args: str = opt(
        "",
        "the model's settings, as lm_eval's --model_args: e.g. gen_length=256,steps=256,block_length=32,"
        "cache=dual,threshold=0.9,mc_num=128,seed=1234 (difflm.evaluate.lm_eval.HarnessSettings)",
    )
    include_path: str | None = opt(None, "a folder of extra task YAMLs")
    limit: float | None = opt(None, "only the first N documents of each task (a fraction if < 1)")
    num_fewshot: int | None = opt(None, "few-shot examples (task default)")
    apply_chat_template: bool = opt(False, "format prompts with the tokenizer's chat template")
