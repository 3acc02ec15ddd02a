"""Text-generation metrics shared by the evaluators: exact match, token accuracy, chrF and BLEU.

Accuracy is micro-averaged (correct positions over all scored positions, so a long poem counts
for more than a short one). chrF and BLEU are corpus-level scores from sacrebleu (0-100), the
standard implementations, so numbers are comparable with published ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from difflm.errors import DifflmError


def token_accuracy(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Fraction of positions where prediction == reference, over all pairs (micro average)."""
    if len(predictions) != len(references):
        raise DifflmError(
            f"{len(predictions)} predictions for {len(references)} references; pass one per reference"
        )
    correct = total = 0
    for pred, ref in zip(predictions, references, strict=True):
        if len(pred) != len(ref):
            raise DifflmError(
                f"a prediction has {len(pred)} tokens for a reference of {len(ref)}; align them first"
            )
        correct += sum(int(p == r) for p, r in zip(pred, ref, strict=True))
        total += len(ref)
    if total == 0:
        raise DifflmError("no position to score: every reference is empty")
    return correct / total


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not references:
        raise DifflmError(
            f"need one hypothesis per reference and at least one pair, got {len(hypotheses)} and {len(references)}"
        )


def chrf(
    hypotheses: Sequence[str], references: Sequence[str], *, char_order: int = 6, word_order: int = 0
) -> float:
    """Corpus chrF (word_order=2 gives chrF++), 0-100."""
    from sacrebleu.metrics import CHRF

    _check_pairs(hypotheses, references)
    metric = CHRF(char_order=char_order, word_order=word_order)
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a") -> float:
    """Corpus BLEU, 0-100; tokenize='zh' or 'char' for text without spaces."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    metric = BLEU(tokenize=tokenize, effective_order=True)
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def exact_match(predictions: Sequence[Sequence], references: Sequence[Sequence]) -> float:
    """Fraction of predictions equal to their reference as a whole (token ids or strings)."""
    if len(predictions) != len(references) or not references:
        raise DifflmError(
            f"need one prediction per reference and at least one pair, got {len(predictions)} and {len(references)}"
        )
    return sum(list(p) == list(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def words(text: str) -> list[str]:
    """Lower-cased words: maximal runs of letters and apostrophes."""
    return re.findall(r"[a-z']+", text.lower())


def word_quality(text: str, vocabulary: set[str]) -> dict[str, float]:
    """How much a sample reads like its corpus: the fraction of its words that occur in the corpus
    (`vocabulary`, e.g. `set(words(corpus))`) and the longest run of one word repeated in a row."""
    ws = words(text)
    if not ws:
        return {"words": 0, "in_corpus": 0.0, "max_repeat": 0}
    longest = run = 1
    for prev, word in zip(ws, ws[1:], strict=False):
        run = run + 1 if word == prev else 1
        longest = max(longest, run)
    return {"words": len(ws), "in_corpus": sum(w in vocabulary for w in ws) / len(ws), "max_repeat": longest}
