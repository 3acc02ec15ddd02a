"""Poem corpus: forgiving loader with counts, "/" joining and cleaning, seeded split by poem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difflm.data.poems import Poem, build_poems, load_poems, load_split, poem_text, split_poems, text_id
from difflm.errors import DifflmError


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(title: str, content: str, author: str = "某人") -> str:
    return json.dumps({"title": title, "author": author, "content": content}, ensure_ascii=False)


def test_loader_skips_broken_and_incomplete_records_with_counts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            record("一", "第一行\n\n第二行"),
            '{"title": "坏", "author": "x", "content": ',  # line 2: truncated JSON
            json.dumps({"title": "缺", "content": "没有作者"}),  # line 3: no author
            "",  # blank lines are not records
            json.dumps({"title": "空", "author": "x", "content": "  \n "}),  # line 5: blank content
            "[1, 2]",  # line 6: JSON but not an object
            record("二", "还有一行"),
        ],
    )
    poems, report = load_poems(path)
    assert [p.title for p in poems] == ["一", "二"]
    assert [p.line for p in poems] == [1, 7]
    assert (report.kept, report.skipped_broken, report.skipped_missing) == (2, 2, 2)
    assert report.broken_lines == [2, 6] and report.missing_lines == [3, 5]


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DifflmError, match="not found"):
        load_poems(tmp_path / "none.jsonl")
    with pytest.raises(DifflmError, match="no usable poem"):
        load_poems(write_jsonl(tmp_path / "bad.jsonl", ["{oops"]))


def test_poem_text_joins_lines_and_cleans() -> None:
    content = (
        "\u3000\u3000春天  来了，见 https://example.com/a?b=1 吧\n\n"
        "\n"
        "花\x07开\ue003了 www.poems.cn/x\t\t 好\n\n"
        "  \n"
        "天/地 《诗》——「完」……"
    )
    poem = Poem("春", "某人", content)
    assert poem_text(poem) == "春天 来了，见 吧/花开了 好/天／地 《诗》——「完」……"


def test_split_is_disjoint_seeded_and_deduplicated() -> None:
    poems = [Poem(f"t{i}", "a", f"第{i}首\n\n诗") for i in range(50)]
    copies = [Poem("copy", "b", "第7首\n\n\n诗  "), Poem("url only", "c", "http://x.org")]
    splits = split_poems(poems + copies, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"test": 5, "dev": 5, "train": 40}
    texts = {k: {poem_text(p) for p in v} for k, v in splits.items()}
    assert not (
        texts["train"] & texts["dev"] or texts["train"] & texts["test"] or texts["dev"] & texts["test"]
    )
    assert set().union(*texts.values()) == {poem_text(p) for p in poems}  # duplicate + empty dropped
    assert split_poems(list(reversed(poems)), seed=3) == splits  # file order does not matter
    assert split_poems(poems, seed=4)["test"] != splits["test"]
    with pytest.raises(DifflmError, match="summing to 1"):
        split_poems(poems, seed=0, fractions=(0.5, 0.1, 0.1))


def test_build_and_load_split_round_trip(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "p.jsonl", [record(f"t{i}", f"第{i}行\n\n第二行") for i in range(20)] + ["{"]
    )
    counts = build_poems(src, tmp_path / "out", seed=0)
    assert counts == {
        "train": 16, "dev": 2, "test": 2, "read": 20,
        "skipped_broken": 1, "skipped_missing": 0, "dropped_duplicate_or_empty": 0,
    }  # fmt: skip
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert manifest["seed"] == 0 and manifest["counts"] == counts and len(manifest["source_md5"]) == 32
    test = load_split(tmp_path / "out", "test")
    assert sorted(text_id(t) for t in test) == manifest["test_ids"]
    train = load_split(tmp_path / "out", "train")
    assert len(train) == 16 and not set(train) & set(test)
    row = json.loads((tmp_path / "out" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(row) == {"title", "author", "text"} and row["text"].endswith("/第二行")
    (tmp_path / "out" / "test.jsonl").write_text(json.dumps({"text": train[0]}) + "\n")
    with pytest.raises(DifflmError, match="does not match the test ids"):
        load_split(tmp_path / "out", "test")
    with pytest.raises(DifflmError, match="unknown poem split"):
        load_split(tmp_path / "out", "valid")
    with pytest.raises(DifflmError, match="run build_poems"):
        load_split(tmp_path / "nowhere", "train")
