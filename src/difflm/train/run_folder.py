"""The run folder's safety rules: a new run never overwrites another, and a stop never loses steps.

- `claim_output_dir`: training into a folder that already holds a run (checkpoints or a log) is
  refused unless the run is resumed (`train.resume`) or `train.overwrite=true` moves the old run
  aside to `{output_dir}.old-{timestamp}`. The folder must be writable before any step is spent.
  Temporary folders of killed saves (`checkpoints/.tmp-*`) and half-finished prunes are removed.
- `trim_log`: after a resume at step N, `log.jsonl` keeps only the records of steps <= N, so the
  replayed steps appear once.
- `StopSignals`: SIGINT / SIGTERM ask the loop to save a checkpoint after the current step and stop;
  a second signal stops at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from difflm.config import TrainConfig
from difflm.errors import DifflmError
from difflm.train import checkpoint as ckpt

LOG_FILE = "log.jsonl"


def holds_run(output_dir: Path) -> str | None:
    """What shows `output_dir` holds a run ('step-20', 'a log'), or None when it holds none."""
    root = ckpt.checkpoints_dir(output_dir)
    steps = sorted(n for p in root.glob("step-*") if (n := ckpt.step_number(p)) is not None)
    if steps:
        return f"checkpoints up to step-{steps[-1]}"
    if (root / "latest").exists():
        return "a checkpoints/latest file"
    log = output_dir / LOG_FILE
    if log.is_file() and log.stat().st_size > 0:
        return f"a {LOG_FILE}"
    return None


def claim_output_dir(tc: TrainConfig, is_writer: bool) -> None:
    """Check (and, on the writing process, prepare) `tc.output_dir` for a new or resumed run."""
    out = Path(tc.output_dir)
    if out.exists() and not out.is_dir():
        raise DifflmError(f"train.output_dir={out} is a file; choose a folder")
    if tc.overwrite and tc.resume:
        raise DifflmError("train.overwrite=true and train.resume both set: resume the run, or overwrite it")
    found = holds_run(out) if out.is_dir() else None
    if found and not tc.resume and not tc.overwrite:
        raise DifflmError(
            f"train.output_dir={out} already holds a run ({found}): continue it with train.resume=latest, "
            "move it aside with train.overwrite=true, or choose another train.output_dir"
        )
    if not is_writer:
        return
    if found and tc.overwrite:
        aside = _aside_name(out)
        out.rename(aside)
        print(f"train.overwrite: moved the previous run to {aside}", flush=True)
    _check_writable(out)
    ckpt.remove_leftovers(ckpt.checkpoints_dir(out), (".tmp-", ".trash-", ".old-"))


def _aside_name(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while candidate.exists():
        candidate, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
    return candidate


def _check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DifflmError(
            f"cannot write to train.output_dir={out} ({err.strerror or err}); choose a writable folder"
        ) from None


def trim_log(output_dir: str | Path, step: int) -> None:
    """Drop the log records of steps after `step` (replayed after a resume), atomically."""
    log = Path(output_dir) / LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by a kill
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
    tmp = log.with_name(f".{LOG_FILE}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, log)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after the final checkpoint of a run stopped by SIGINT / SIGTERM."""


class StopSignals:
    """Within `with`: SIGINT / SIGTERM set `requested`; a second one raises KeyboardInterrupt at once.

    Only the main thread can install handlers; elsewhere (a test thread) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
