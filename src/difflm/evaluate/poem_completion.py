"""Poem completion: fill masked characters of unseen test poems, diffusion vs autoregressive.

Protocol (identical for every model and run):
- Poems: the first `n_poems` of the split's test.jsonl (already a seeded order; or of any JSONL of
  poems given with --poems, in file order), each as its
  training document (`document_ids`: text + EOS), truncated to the shorter of both models' lengths.
- Masked positions: for poem i and ratio r, a torch.Generator seeded from (seed, i, r) draws
  round(r * n) of the n eligible positions: non-special tokens that are not the line separator
  "/", at index >= max(prefix_len, 1) (the prompt the prefix model never had masked; index 0 has
  no left context for the AR model). Positions depend only on the token ids and the seed.
- Diffusion: `difflm.sampling.unmask.infill` over all masked positions at once, greedy (argmax),
  keep mode, low-confidence remasking, `steps` denoising steps per batch of poems (default one
  token per step); the model sees both sides.
- AR left-to-right (the seed): masked positions filled in order with the argmax given the left
  context, earlier masked positions holding the model's own fills.
- AR rescored (both sides): start from the left-to-right fill; then, left to right, for each masked
  position try the top-`candidates` tokens of the left-context prediction and keep the one
  maximising the AR log-likelihood of the whole poem (all tokens from that position to the end,
  the other masked positions holding their current fills).
- Every method knows the protocol: a masked position is never a special token or "/", so those
  ids are never predicted (an undertrained model's most likely token is often "/").
- Metrics: exact token accuracy over masked positions (micro average, the seed's) and corpus chrF
  (sacrebleu) of the filled poems against the originals. chrF includes the unmasked context, which
  is the same for every method, so it compresses differences but ranks them fairly.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from difflm.data.poems import SEPARATOR, load_poems, load_split, poem_text
from difflm.data.tokenizers import Tokenizer
from difflm.errors import DifflmError
from difflm.evaluate.metrics import chrf, token_accuracy
from difflm.evaluate.options import EvalOptions
from difflm.fields import opt
from difflm.models.layers import KVCache
from difflm.models.transformer import Transformer
from difflm.pretrained import Pretrained, load_pretrained
from difflm.sampling.unmask import SampleConfig, infill
from difflm.systems.prefix_diffusion import document_ids

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class CompletionConfig:
    """How the poem-completion benchmark runs."""

    ratios: list = opt(list(RATIOS), "Mask ratios, each in (0, 1).")
    n_poems: int = opt(100, "Test poems used (the first ones of test.jsonl).")
    seed: int = opt(0, "Seed of the masked positions.")
    prefix_len: int = opt(16, "Positions before this index are never masked (the prompt).")
    steps: int | None = opt(None, "Diffusion steps per poem batch (null = one token per step).")
    candidates: int = opt(5, "AR rescoring: top-k candidates tried per masked position (0 = skip).")
    batch_size: int = opt(50, "Poems per forward pass.")

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0.0 < float(r) < 1.0 for r in self.ratios):
            raise DifflmError(f"mask ratios {self.ratios} must each be in (0, 1), e.g. 0.1 ... 0.6")
        if self.candidates < 0:
            raise DifflmError(f"candidates must be >= 0 (0 skips AR rescoring), got {self.candidates}")
        for name in ("n_poems", "batch_size"):
            if getattr(self, name) < 1:
                raise DifflmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_len < 0 or (self.steps is not None and self.steps < 1):
            raise DifflmError("prefix_len must be >= 0 and steps >= 1 (or null)")


@dataclass
class Case:
    """One poem at one ratio: its clean ids and the sorted masked positions."""

    ids: list[int]
    positions: list[int] = field(default_factory=list)

    @property
    def answers(self) -> list[int]:
        return [self.ids[p] for p in self.positions]


def excluded_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids never masked: special tokens, padding and the line separator."""
    return set(tokenizer.special_ids) | {tokenizer.pad_token_id} | set(tokenizer.encode(SEPARATOR))


def masked_positions(
    ids: Sequence[int], ratio: float, *, prefix_len: int, excluded: set[int], generator: torch.Generator
) -> list[int]:
    """round(ratio * n) of the n eligible positions, drawn with `generator`, sorted."""
    if not 0.0 < ratio < 1.0:
        raise DifflmError(f"mask ratio {ratio} must be in (0, 1)")
    start = max(prefix_len, 1)
    eligible = [i for i, token in enumerate(ids) if i >= start and token not in excluded]
    k = round(ratio * len(eligible))
    order = torch.randperm(len(eligible), generator=generator)[:k].tolist()
    return sorted(eligible[j] for j in order)


def case_generator(seed: int, poem: int, ratio: float) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + poem * 7919 + round(ratio * 1000))


def build_cases(texts: Sequence[str], tokenizer: Tokenizer, max_length: int, cfg: CompletionConfig) -> dict:
    """{ratio: [Case] * n_poems}; poems with no eligible position are skipped (for every ratio)."""
    excluded = excluded_ids(tokenizer)
    docs = [document_ids(tokenizer, text)[:max_length] for text in texts]
    usable = [i for i, d in enumerate(docs) if len(d) > max(cfg.prefix_len, 1) + 1][: cfg.n_poems]
    if len(usable) < cfg.n_poems:
        raise DifflmError(f"only {len(usable)} test poems are longer than the prefix; lower n_poems")
    cases = {}
    for ratio in cfg.ratios:
        cases[ratio] = [
            Case(
                docs[i],
                masked_positions(
                    docs[i],
                    ratio,
                    prefix_len=cfg.prefix_len,
                    excluded=excluded,
                    generator=case_generator(cfg.seed, i, ratio),
                ),
            )
            for i in usable
        ]
    return cases


# ----------------------------------------------------------------------------- fillers


def _pad(cases: Sequence[Case], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """ids [B, L], real [B, L], fill [B, L] (masked positions) for a chunk of cases, on `device`."""
    length = max(len(c.ids) for c in cases)
    ids = torch.full((len(cases), length), pad_id, dtype=torch.long)
    real = torch.zeros_like(ids)
    fill = torch.zeros_like(ids, dtype=torch.bool)
    for r, case in enumerate(cases):
        ids[r, : len(case.ids)] = torch.tensor(case.ids)
        real[r, : len(case.ids)] = 1
        fill[r, case.positions] = True
    return ids.to(device), real.to(device), fill.to(device)


def _device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def fill_diffusion(
    model: nn.Module, cases: Sequence[Case], tokenizer: Tokenizer, cfg: CompletionConfig
) -> list[list[int]]:
    """Predicted tokens at each case's masked positions, by iterative unmasking (both sides seen)."""
    suppress = sorted(excluded_ids(tokenizer) - {tokenizer.mask_token_id})
    preds: list[list[int]] = []
    for chunk in _chunks(cases, cfg.batch_size):
        ids, real, fill = _pad(chunk, tokenizer.pad_token_id, _device(model))
        n_max = int(fill.sum(1).max())
        if n_max == 0:
            preds += [[] for _ in chunk]
            continue
        steps = min(cfg.steps or n_max, n_max)
        sample = SampleConfig(gen_length=n_max, steps=steps, suppress_tokens=suppress)
        out = infill(model, ids, fill, sample, attention_mask=real).tokens  # [B, L]
        preds += [out[r, c.positions].tolist() for r, c in enumerate(chunk)]
    return preds


def _ar_logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()  # [B, L, V]


def _left_to_right(model, ids: Tensor, chunk: Sequence[Case], banned: list[int]) -> Tensor:
    """Fill every masked position in order from the left context; returns ids [B, L]."""
    if isinstance(model, Transformer) and model.config.causal:
        return _left_to_right_cached(model, ids, chunk, banned)
    x = ids.clone()
    for k in range(max(len(c.positions) for c in chunk)):
        rows = [r for r, c in enumerate(chunk) if k < len(c.positions)]
        pos = torch.tensor([chunk[r].positions[k] for r in rows], device=x.device)
        logits = _ar_logits(model, x[rows, : int(pos.max())])  # [b, l, V]
        logits[..., banned] = float("-inf")
        x[rows, pos] = logits[torch.arange(len(rows), device=x.device), pos - 1].argmax(-1)
    return x


def _left_to_right_cached(
    model: Transformer, ids: Tensor, chunk: Sequence[Case], banned: list[int]
) -> Tensor:
    """The same fill with a KV cache: one token per row per forward, each position computed once.

    Rows are right padded, so a row's padding only ever follows its real tokens (causal attention).
    """
    x = ids.clone()
    fill = torch.zeros_like(x, dtype=torch.bool)
    for r, case in enumerate(chunk):
        fill[r, case.positions] = True
    first = int(fill.any(0).nonzero().min())  # first column with a masked position (>= 1)
    cache = KVCache.for_model(model, x.shape[0], x.shape[1])
    logits = model(x[:, :first], kv_cache=cache)[:, -1].float()  # [B, V] predicting column `first`
    for j in range(first, x.shape[1]):
        logits[:, banned] = float("-inf")
        x[:, j] = torch.where(fill[:, j], logits.argmax(-1), x[:, j])
        if j + 1 < x.shape[1] and fill[:, j + 1 :].any():
            logits = model(x[:, j : j + 1], position_offset=j, kv_cache=cache)[:, -1].float()
        else:
            break
    return x


def _suffix_loglik(model, x: Tensor, real: Tensor, start: Tensor) -> Tensor:
    """Sum of log p(x_j | x_<j) over real positions j >= start[b]: [B]."""
    logp = _ar_logits(model, x[:, :-1]).log_softmax(-1)  # [B, L-1, V]
    token_logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, L-1] for j = 1..L-1
    j = torch.arange(1, x.shape[1], device=x.device)
    keep = real[:, 1:].bool() & (j[None, :] >= start[:, None])
    return (token_logp * keep).sum(1)


def _rescore(model, x: Tensor, real: Tensor, chunk: Sequence[Case], banned: list[int], n_cand: int) -> Tensor:
    """Revisit masked positions left to right, keeping the candidate with the best poem likelihood."""
    x = x.clone()
    for k in range(max(len(c.positions) for c in chunk)):
        rows = torch.tensor([r for r, c in enumerate(chunk) if k < len(c.positions)], device=x.device)
        pos = torch.tensor([chunk[r].positions[k] for r in rows.tolist()], device=x.device)
        logits = _ar_logits(model, x[rows, : int(pos.max())])  # [b, l, V]
        logits[..., banned] = float("-inf")
        arange = torch.arange(len(rows), device=x.device)
        cands = logits[arange, pos - 1].topk(n_cand, dim=-1).indices  # [b, C]
        trial = x[rows].repeat_interleave(n_cand, 0)  # [b*C, L]
        trial[torch.arange(len(trial), device=x.device), pos.repeat_interleave(n_cand)] = cands.flatten()
        scores = _suffix_loglik(
            model, trial, real[rows].repeat_interleave(n_cand, 0), pos.repeat_interleave(n_cand)
        ).view(len(rows), n_cand)  # [b, C]
        x[rows, pos] = cands[arange, scores.argmax(1)]
    return x


def fill_ar_left(
    model: nn.Module, cases: Sequence[Case], tokenizer: Tokenizer, cfg: CompletionConfig
) -> list[list[int]]:
    """Left-to-right predictions at each case's masked positions (left context only)."""
    banned = sorted(excluded_ids(tokenizer) | {tokenizer.mask_token_id})
    preds = []
    for chunk in _chunks(cases, cfg.batch_size):
        ids, _, fill = _pad(chunk, tokenizer.pad_token_id, _device(model))
        if not fill.any():
            preds += [[] for _ in chunk]
            continue
        x = _left_to_right(model, ids.masked_fill(fill, tokenizer.mask_token_id), chunk, banned)
        preds += [x[r, c.positions].tolist() for r, c in enumerate(chunk)]
    return preds


def fill_ar_rescored(
    model: nn.Module,
    cases: Sequence[Case],
    start: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    cfg: CompletionConfig,
) -> list[list[int]]:
    """Predictions rescored with both sides, starting from the fills `start` (left-to-right)."""
    banned = sorted(excluded_ids(tokenizer) | {tokenizer.mask_token_id})
    preds = []
    for lo in range(0, len(cases), cfg.batch_size):
        chunk = cases[lo : lo + cfg.batch_size]
        ids, real, fill = _pad(chunk, tokenizer.pad_token_id, _device(model))
        if not fill.any():
            preds += [[] for _ in chunk]
            continue
        for r, case in enumerate(chunk):
            ids[r, case.positions] = torch.tensor(start[lo + r], dtype=torch.long, device=ids.device)
        y = _rescore(model, ids, real, chunk, banned, cfg.candidates)
        preds += [y[r, c.positions].tolist() for r, c in enumerate(chunk)]
    return preds


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- the benchmark


def score(cases: Sequence[Case], preds: Sequence[Sequence[int]], tokenizer: Tokenizer) -> dict:
    """Accuracy over masked positions and chrF of the filled poems (EOS and padding dropped)."""
    filled = []
    for case, pred in zip(cases, preds, strict=True):
        ids = list(case.ids)
        for p, token in zip(case.positions, pred, strict=True):
            ids[p] = token
        filled.append(ids)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return {
        "accuracy": token_accuracy(preds, [c.answers for c in cases]),
        "chrf": chrf([text(f) for f in filled], [text(c.ids) for c in cases]),
        "masked": sum(len(c.positions) for c in cases),
    }


def correct_per_poem(cases: Sequence[Case], preds: Sequence[Sequence[int]]) -> Tensor:
    """Correctly filled positions per poem [P]."""
    return torch.tensor(
        [
            sum(int(a == b) for a, b in zip(p, c.answers, strict=True))
            for c, p in zip(cases, preds, strict=True)
        ]
    )


def bootstrap_ci(
    hits: Tensor, baseline: Tensor | None, cases: Sequence[Case], seed: int, draws: int = 2000
) -> tuple[float, float]:
    """95% percentile interval of the micro accuracy (minus the baseline's on the same poems, when
    given) over `draws` resamples of the poems with replacement, seeded."""
    masked = torch.tensor([len(c.positions) for c in cases], dtype=torch.float64)  # [P]
    pick = torch.randint(len(cases), (draws, len(cases)), generator=torch.Generator().manual_seed(seed))
    total = masked[pick].sum(1).clamp(min=1)  # [draws]
    value = hits.double()[pick].sum(1) / total
    if baseline is not None:
        value = value - baseline.double()[pick].sum(1) / total
    low, high = torch.quantile(value, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return round(low, 4), round(high, 4)


def _check_pair(diffusion: Pretrained, ar: Pretrained) -> None:
    if diffusion.tokenizer.fingerprint() != ar.tokenizer.fingerprint():
        raise DifflmError(
            "the diffusion and AR checkpoints use different tokenizers; train both on the same split "
            "with the same data.tokenizer so masked positions mean the same tokens"
        )
    if getattr(diffusion.model, "mask_token_id", None) is None:
        raise DifflmError(f"{diffusion.path} is not a masked-diffusion checkpoint (no mask_token_id)")
    if not getattr(getattr(ar.model, "config", None), "causal", False):
        raise DifflmError(f"{ar.path} is not a causal (autoregressive) checkpoint")


def _fill_all(
    diffusion: Pretrained, ar: Pretrained, cases: Sequence[Case], tokenizer: Tokenizer, cfg: CompletionConfig
) -> tuple[dict, dict]:
    """Predictions and wall seconds of each method on the same cases."""
    preds, seconds, start = {}, {}, time.perf_counter()

    def done(method: str) -> None:
        nonlocal start
        seconds[method] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()

    preds["diffusion"] = fill_diffusion(diffusion.model, cases, tokenizer, cfg)
    done("diffusion")
    preds["ar_left_to_right"] = fill_ar_left(ar.model, cases, tokenizer, cfg)
    done("ar_left_to_right")
    if cfg.candidates:
        preds["ar_rescored"] = fill_ar_rescored(ar.model, cases, preds["ar_left_to_right"], tokenizer, cfg)
        done("ar_rescored")
    return preds, seconds


def run_poem_completion(
    diffusion: Pretrained,
    ar: Pretrained,
    texts: Sequence[str],
    cfg: CompletionConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per (method, ratio): accuracy with its 95% bootstrap interval over poems, chrF,
    masked count, seconds; diffusion rows also the interval of (diffusion - AR left-to-right)."""
    _check_pair(diffusion, ar)
    tokenizer = diffusion.tokenizer
    max_length = min(diffusion.config.data.block_size, ar.config.data.block_size)
    cases = build_cases(texts, tokenizer, max_length, cfg)
    rows = []
    for ratio, ratio_cases in cases.items():
        with torch.no_grad():
            preds, seconds = _fill_all(diffusion, ar, ratio_cases, tokenizer, cfg)
        hits = {m: correct_per_poem(ratio_cases, p) for m, p in preds.items()}
        for method in preds:
            row = {"method": method, "ratio": ratio, **score(ratio_cases, preds[method], tokenizer)}
            row["acc_ci95"] = bootstrap_ci(hits[method], None, ratio_cases, cfg.seed)
            if method == "diffusion":
                row["minus_ar_ci95"] = bootstrap_ci(
                    hits[method], hits["ar_left_to_right"], ratio_cases, cfg.seed
                )
            row.update(poems=len(ratio_cases), seconds=seconds[method])
            rows.append(row)
            log(
                f"ratio {ratio:.1f} {method:>17}: acc {row['accuracy']:.4f} chrF {row['chrf']:.2f} ({row['seconds']}s)"
            )
    return rows


def write_outputs(rows: list[dict], out_dir: str | Path, title: str = "Poem completion") -> dict[str, Path]:
    """results.csv, results.json, table.md and plot.png (accuracy and chrF against the mask ratio)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "results.csv",
        "json": out / "results.json",
        "table": out / "table.md",
        "plot": out / "plot.png",
    }
    paths["json"].write_text(json.dumps(rows, indent=1), encoding="utf-8")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    paths["table"].write_text(markdown_table(rows, title), encoding="utf-8")
    _plot(rows, paths["plot"], title)
    return paths


def markdown_table(rows: list[dict], title: str) -> str:
    """Ratios as rows; per method an accuracy (with its 95% interval over poems) and a chrF column."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    by = {(r["method"], r["ratio"]): r for r in rows}
    head = "| mask ratio | " + " | ".join(f"{m} acc | {m} chrF" for m in methods) + " |"
    lines = [f"### {title}", "", head, "|---" * (1 + 2 * len(methods)) + "|"]
    for ratio in ratios:
        cells = [_cell(by[m, ratio]) for m in methods]
        lines.append(f"| {ratio:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict) -> str:
    low, high = row["acc_ci95"]
    return f"{row['accuracy']:.4f} [{low:.3f}, {high:.3f}] | {row['chrf']:.2f}"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "accuracy", "token accuracy"), (axes[1], "chrf", "chrF")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["ratio"], r[metric]) for r in rows if r["method"] == method]
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_xlabel("mask ratio")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


@dataclass
class PoemOptions:
    """`difflm eval poem-completion` (its --seed, --batch-size, --device, --json are `EvalOptions`')."""

    diffusion: str | None = opt(None, "masked-diffusion checkpoint")
    ar: str | None = opt(None, "autoregressive checkpoint (same tokenizer)")
    split_dir: str | None = opt(None, "folder written by `difflm data build-poems`")
    poems: str | None = opt(
        None, "score this JSONL of poems instead (title, author, content: build-poems' input)"
    )
    out_dir: str = opt("poem_completion", "where results.csv, table.md, plot.png go")
    n_poems: int = opt(100, "poems scored")
    ratios: str = opt(",".join(map(str, RATIOS)), "comma-separated mask ratios")
    denoise_steps: int | None = opt(None, "diffusion steps (default: 1 token/step)")
    candidates: int = opt(5, "AR rescoring: candidates per position (0 = skip)")
    prefix_len: int = opt(16, "positions before this are never masked")


def main(opts: PoemOptions, shared: EvalOptions) -> int:
    """Run the benchmark and write its outputs; `shared` gives seed, batch size, device and --json."""
    missing = [f"--{n}" for n in ("diffusion", "ar") if getattr(opts, n) is None]
    if (opts.split_dir is None) == (opts.poems is None):
        missing.append("exactly one of --split-dir / --poems")
    if missing:
        raise DifflmError(f"poem-completion needs {', '.join(missing)}")
    try:
        ratios = [float(r) for r in opts.ratios.split(",") if r.strip()]
    except ValueError:
        raise DifflmError(f"--ratios {opts.ratios!r} must be comma-separated numbers, e.g. 0.1,0.2") from None
    cfg = CompletionConfig(
        ratios=ratios,
        n_poems=opts.n_poems,
        seed=shared.seed,
        prefix_len=opts.prefix_len,
        steps=opts.denoise_steps,
        candidates=opts.candidates,
        batch_size=shared.batch_size,
    )
    texts = (
        load_split(opts.split_dir, "test")
        if opts.poems is None
        else [poem_text(p) for p in load_poems(opts.poems)[0]]
    )
    diffusion, ar = load_pretrained(opts.diffusion, shared.device), load_pretrained(opts.ar, shared.device)
    log = (lambda _: None) if shared.json else print
    rows = run_poem_completion(diffusion, ar, texts, cfg, log)
    paths = write_outputs(rows, opts.out_dir)
    if shared.json:
        print(json.dumps({"poems": opts.poems or opts.split_dir, "rows": rows}))
        return 0
    print(paths["table"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
