"""The in-process A/B of SGDD batch-1 decoding that `*_ab.py` beside this file run: two versions of
a decode alternate per sentence in one process, so the machine's drift hits both alike. CFG 0 and
2, 30 held-out sentences, each decoded `reps` times per version, its fastest kept.
"""

import time
from collections.abc import Callable

import torch

from difflm.pretrained import load_pretrained
from difflm.systems.sgdd import build_examples, load_encoder, split_examples


def held_out(run: str, threads: int, sentences: int = 30):
    """(the checkpoint, the encoder's vectors [N, D] of its first held-out sentences)."""
    torch.set_num_threads(threads)
    pre = load_pretrained(run)
    pairs = split_examples(pre.config, "val")[:sentences]
    data = build_examples(pairs, load_encoder(pre.config.model.encoder), pre.tokenizer, pre.config, 128)
    return pre, data.vectors


def compare(versions: dict[str, Callable], vectors: torch.Tensor, reps: int = 4) -> None:
    """Print, per CFG scale, each version's mean of its fastest ms per sentence (the first is the
    old one), their ratio and how many sentences both decode to the same text.
    `versions`: name -> decode(vectors [1, D], cfg_scale) -> token ids."""
    (old, old_fn), (new, new_fn) = versions.items()
    n = len(vectors)
    for scale in (0.0, 2.0):
        best: dict = {}
        old_fn(vectors[:1], scale), new_fn(vectors[:1], scale)  # warm-up
        for rep in range(reps):
            for i in range(n):
                for name in (new, old) if (rep + i) % 2 else (old, new):
                    start = time.perf_counter()
                    out = versions[name](vectors[i : i + 1], scale)[0]
                    ms = 1000 * (time.perf_counter() - start)
                    best[(name, i)] = (min(best.get((name, i), (float("inf"),))[0], ms), out)
        mean = {name: sum(best[(name, i)][0] for i in range(n)) / n for name in versions}
        same = sum(best[(new, i)][1] == best[(old, i)][1] for i in range(n))
        print(
            f"CFG {scale:g}: {old} {mean[old]:.1f} ms   {new} {mean[new]:.1f} ms   "
            f"({mean[old] / mean[new]:.2f}x)   same text {same} / {n}",
            flush=True,
        )
