"""benchmarks/sgdd.py: the --grid items it parses and the table columns they fill."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from difflm.evaluate.sgdd_verify import Verification

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sgdd.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_sgdd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script()


def test_grid_items_name_their_verification():
    assert bench.parse_setting("1:0") == Verification()
    assert bench.parse_setting("4:2") == Verification(candidates=4, rounds=2)
    assert bench.parse_setting("4:0:12") == Verification(candidates=4, search=12)
    assert bench.parse_setting("4:0:12:1") == Verification(candidates=4, search=12, patience=1)
    assert bench.parse_setting("4:0:12:3:0.003") == Verification(candidates=4, search=12, fluency=0.003)
    for bad in ("4", "4:x", "4:0:12:3:w", "1:2:3:4:5:6"):
        with pytest.raises(SystemExit, match="--grid item"):
            bench.parse_setting(bad)


def test_settings_that_differ_only_in_fluency_share_one_search():
    grid = [bench.parse_setting(item) for item in ("1:0", "4:0:12:3:0", "4:0:12:3:0.003", "4:0:8", "4:0:12:3:0.01")]
    groups = bench.same_search(grid)
    assert [(v.candidates, v.search, weights) for v, weights in groups] == [
        (1, 0, [0.0]), (4, 12, [0.0, 0.003, 0.01]), (4, 8, [0.0])
    ]


def test_table_shows_patience_and_fluency_only_with_search():
    row = {"N": 4, "R": 0, "exact_match": 0.25, "token_acc": 0.3, "bleu": 35.0, "chrf": 58.0, "cosine": 0.93, "ms_per_sentence": 9.0}
    result = {"name": "m", "params": 1e6, "train_minutes": 1.0, "steps": 10, "latency_ms_batch1": {}}
    settings = [row, {**row, "S": 12, "P": 3, "F": 0.003}, {**row, "S": 8}, {**row, "S": 12, "P": 3, "F": 0.001, "pool": 32}]
    lines = bench.table([{**result, "settings": settings}])
    plain, fluent, old, pooled = (line.split(" | ")[6:9] for line in lines.splitlines()[2:6])
    assert plain == ["0", "-", "-"] and old == ["8", "1", "0"]
    assert fluent == ["12", "3", "0.003/16"]  # rows from before the pool was recorded chose among 16
    assert pooled == ["12", "3", "0.001/32"]


def test_merge_keeps_every_earlier_command(tmp_path, monkeypatch):
    """--merge carries each merged folder's command.txt (history and hand notes) in order, then its own command."""
    run = {"name": "m", "params": 1e6, "train_minutes": 1.0, "steps": 10, "curve": [[5, 3.0], [10, 2.5]],
           "settings": [], "samples": [], "latency_ms_batch1": {}}
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, command in ((old, "python a.py"), (new, "python b.py")):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"command": command, "runs": [run]}))
    (old / "command.txt").write_text("# stop 1\npython a.py\n# stop 2: a note\n")
    argv = ["sgdd.py", "--merge", str(old), "--merge", str(new), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    lines = (tmp_path / "out" / "command.txt").read_text().splitlines()
    assert lines[:4] == ["# stop 1", "python a.py", "# stop 2: a note", "python b.py"]
    assert len(lines) == 5 and "--merge" in lines[4]
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2
