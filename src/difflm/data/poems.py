"""The poem corpus for the prefix-diffusion (BERT/RoBERTa) system: load, clean, split, write.

Source: JSONL with `title`, `author`, `content`; `content` holds one verse line per line, and the
corpus separates every line by a blank line, so blank lines carry no stanza information.

Choices:
- Loading is forgiving: a line that is not a JSON object, or a record whose `title`/`author` is
  absent or not a string or whose `content` is absent, not a string or blank, is SKIPPED and
  counted in `LoadReport` (with the first few line numbers), so one bad record in a scraped
  corpus does not stop a build, yet the count makes it visible.
- `poem_text` writes a poem as one string, lines joined by a single "/" (blank lines collapse, so
  one "/" per line break). A literal "/" inside a line becomes the full-width "／" so the
  separator stays unambiguous. Cleaning removes URLs, control, format and private-use characters
  (mojibake in this corpus; CJK punctuation is kept) and collapses whitespace, full-width spaces
  included, to one space.
- Splits are by poem and seeded: identical cleaned texts are deduplicated first (first kept) so
  a duplicate cannot sit on both sides, then a permutation of the poems sorted by text id gives
  the same split for the same poems and seed whatever the file order.
- `split.json` records the seed, counts, the source md5 and the ids of the test poems;
  `load_split` checks test texts against those ids, so a benchmark knows its poems are unseen.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflm.errors import DifflmError

FIELDS = ("title", "author", "content")
SPLITS = ("train", "dev", "test")
SEPARATOR = "/"
_URL = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_DROPPED = ("Cc", "Cf", "Co", "Cs", "Cn")  # control, format, private use, surrogate, unassigned
_EXAMPLE_LINES = 5


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    content: str
    line: int = 0  # 1-based line in the source file, 0 when built in code


@dataclass
class LoadReport:
    """What `load_poems` kept and skipped; `*_lines` hold the first few skipped line numbers."""

    kept: int = 0
    skipped_broken: int = 0
    skipped_missing: int = 0
    broken_lines: list[int] = field(default_factory=list)
    missing_lines: list[int] = field(default_factory=list)


def load_poems(path: str | Path) -> tuple[list[Poem], LoadReport]:
    """Read poem JSONL, skipping (and counting) broken lines and incomplete records."""
    path = Path(path)
    if not path.is_file():
        raise DifflmError(f"poem file {path} not found; pass the path of a JSONL poem corpus")
    poems, report = [], LoadReport()
    with path.open(encoding="utf-8") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                report.skipped_broken += 1
                _note(report.broken_lines, number)
            elif not _complete(record):
                report.skipped_missing += 1
                _note(report.missing_lines, number)
            else:
                poems.append(Poem(record["title"], record["author"], record["content"], number))
    report.kept = len(poems)
    if not poems:
        raise DifflmError(f"no usable poem in {path}: every record needs string {', '.join(FIELDS)}")
    return poems, report


def _complete(record: dict) -> bool:
    if not all(isinstance(record.get(name), str) for name in FIELDS):
        return False
    return bool(record["content"].strip())


def _note(lines: list[int], number: int) -> None:
    if len(lines) < _EXAMPLE_LINES:
        lines.append(number)


def clean_line(line: str) -> str:
    """One verse line without URLs, control/private-use characters and runs of whitespace."""
    line = _URL.sub(" ", line)
    line = "".join(ch for ch in line if ch.isspace() or unicodedata.category(ch) not in _DROPPED)
    line = line.replace(SEPARATOR, "／")
    return _SPACES.sub(" ", line).strip()


def poem_text(poem: Poem) -> str:
    """The cleaned poem as one string, its non-empty lines joined by "/"."""
    lines = (clean_line(line) for line in poem.content.splitlines())
    return SEPARATOR.join(line for line in lines if line)


def text_id(text: str) -> str:
    """A short content id (sha256 prefix) naming a cleaned poem text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_poems(
    poems: list[Poem], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, list[Poem]]:
    """A seeded split by poem into train/dev/test, after deduplicating identical cleaned texts.

    Poems whose cleaned text is empty are dropped. dev and test get floor(n * fraction) poems,
    train the rest.
    """
    _check_fractions(fractions)
    unique: dict[str, Poem] = {}
    for poem in poems:
        text = poem_text(poem)
        if text:
            unique.setdefault(text_id(text), poem)
    ordered = [unique[key] for key in sorted(unique)]  # [N], independent of the file order
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ordered), generator=gen).tolist()
    n_dev = int(len(ordered) * fractions[1])
    n_test = int(len(ordered) * fractions[2])
    shuffled = [ordered[i] for i in order]
    return {
        "test": shuffled[:n_test],
        "dev": shuffled[n_test : n_test + n_dev],
        "train": shuffled[n_test + n_dev :],
    }


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DifflmError(
            f"split fractions {tuple(fractions)} must be three non-negative numbers "
            "(train, dev, test) summing to 1, e.g. (0.8, 0.1, 0.1)"
        )
    if fractions[0] <= 0:
        raise DifflmError(f"split fractions {tuple(fractions)} leave no training poems; give train > 0")


def build_poems(
    src: str | Path,
    out_dir: str | Path,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, int]:
    """Write train/dev/test.jsonl ({"title", "author", "text"}) and split.json; return the counts."""
    src, out = Path(src), Path(out_dir)
    poems, report = load_poems(src)
    splits = split_poems(poems, seed, fractions)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        rows = [
            json.dumps({"title": p.title, "author": p.author, "text": poem_text(p)}, ensure_ascii=False)
            for p in splits[name]
        ]
        (out / f"{name}.jsonl").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    unique = sum(len(splits[name]) for name in SPLITS)
    counts = {name: len(splits[name]) for name in SPLITS}
    counts.update(
        read=report.kept,
        skipped_broken=report.skipped_broken,
        skipped_missing=report.skipped_missing,
        dropped_duplicate_or_empty=report.kept - unique,
    )
    manifest = {
        "source": str(src),
        "source_md5": hashlib.md5(src.read_bytes()).hexdigest(),
        "seed": seed,
        "fractions": list(fractions),
        "counts": counts,
        "test_ids": sorted(text_id(poem_text(p)) for p in splits["test"]),
    }
    (out / "split.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return counts


def load_split(out_dir: str | Path, split: str) -> list[str]:
    """The cleaned texts of one split written by `build_poems` (test texts checked against ids)."""
    if split not in SPLITS:
        raise DifflmError(f"unknown poem split {split!r}; choose one of {', '.join(SPLITS)}")
    out = Path(out_dir)
    manifest_path, path = out / "split.json", out / f"{split}.jsonl"
    if not manifest_path.is_file() or not path.is_file():
        raise DifflmError(f"{out} holds no built poem split; run build_poems(src, '{out}', seed) first")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    if split == "test":
        expected = set(json.loads(manifest_path.read_text())["test_ids"])
        if {text_id(t) for t in texts} != expected or len(texts) != len(expected):
            raise DifflmError(
                f"{path} does not match the test ids in split.json; rebuild it with build_poems"
            )
    return texts
