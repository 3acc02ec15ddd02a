"""Where training text comes from: one entry point, `iter_texts`, over every kind of source.

Sources, picked by `format` ("auto" guesses from the path):

- "text": a plain text file. A file is one document, yielded in line-aligned pieces of about
  `CHUNK_CHARS` characters so a huge file streams; the pieces keep their newlines, so
  `"".join(pieces)` is the file exactly (a small file is a single piece).
- "lines": a plain text file with one document per line (e.g. a sentence list); blank lines skipped.
- "folder": every *.txt / *.md file below a folder (recursively, sorted), each read as "text".
- "jsonl": one JSON object a line; the text is `field`, or the first of `TEXT_FIELDS` present.
- "parquet": a Parquet file; `field` is a column, read one row-group batch at a time.
- "arrow": a folder written by `datasets`' `save_to_disk` (a DatasetDict gives `split`).
- "hub": a Hugging Face dataset name, streamed with `datasets.load_dataset` (needs internet).

Files are decoded as strict UTF-8: a bad byte is an error naming the file and byte offset rather
than a silently replaced character that would end up in the vocabulary.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from difflm.errors import DifflmError

TEXT_FIELDS = ("text", "content", "sentence", "document")
TEXT_SUFFIXES = (".txt", ".md")
CHUNK_CHARS = 1 << 20
_BATCH_ROWS = 1024
_ARROW_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
FORMATS = ("auto", "text", "lines", "folder", "jsonl", "parquet", "arrow", "hub")


def iter_texts(
    path: str, *, format: str = "auto", field: str | None = None, split: str = "train"
) -> Iterator[str]:
    """Yield the non-empty texts of a source; raise DifflmError if it has none."""
    if format not in FORMATS:
        raise DifflmError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    kind = detect_format(path) if format == "auto" else format
    if kind != "hub" and not Path(path).expanduser().exists():
        raise DifflmError(f"data file {path} not found; check the path (relative to {Path.cwd()})")
    readers = {
        "text": lambda: _read_text(Path(path).expanduser()),
        "lines": lambda: _read_lines(Path(path).expanduser()),
        "folder": lambda: _read_folder(Path(path).expanduser()),
        "jsonl": lambda: _read_jsonl(Path(path).expanduser(), field),
        "parquet": lambda: _read_parquet(Path(path).expanduser(), field),
        "arrow": lambda: _read_arrow(Path(path).expanduser(), field, split),
        "hub": lambda: _read_hub(path, field, split),
    }
    return _non_empty(readers[kind](), f"{path} (format {kind})")


def _non_empty(texts: Iterator[str], where: str) -> Iterator[str]:
    """Drop empty texts; raise at the end if nothing was left (checked lazily, so it streams)."""
    n = 0
    for text in texts:
        if text:
            n += bool(text.strip())
            yield text
    if n == 0:
        raise DifflmError(f"no text found in {where}; the source is empty or its text field is blank")


def detect_format(path: str) -> str:
    """Guess the source kind from what is on disk; a name that is not a path means the hub."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "arrow" if any((p / m).exists() for m in _ARROW_MARKERS) else "folder"
    if p.is_file():
        return _SUFFIX_FORMATS.get(p.suffix.lower(), "text")
    if _looks_like_path(path):
        raise DifflmError(f"data file {path} not found; check the path (relative to {Path.cwd()})")
    return "hub"


def _looks_like_path(path: str) -> bool:
    """A missing path with a file suffix, a leading ./ ~ / or several slashes is not a hub name."""
    p = Path(path)
    return (
        p.suffix.lower() in _SUFFIX_FORMATS
        or path.startswith((".", "~", "/", "\\"))
        or path.count("/") > 1
        or "\\" in path
    )


def iter_decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, line with its newline), decoding each line as strict UTF-8.

    Splitting the raw bytes at b"\\n" is safe for UTF-8 (0x0A never occurs inside a multi-byte
    character), and it lets the error report the exact byte offset of a bad byte.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DifflmError(
                    f"{path} is not valid UTF-8: byte {raw[e.start]:#04x} at byte offset "
                    f"{offset + e.start} (line {lineno}); re-encode the file as UTF-8 "
                    f"(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(raw)
            yield lineno, line


def _read_text(path: Path) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for _, line in iter_decoded_lines(path):
        buf.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _read_lines(path: Path) -> Iterator[str]:
    for _, line in iter_decoded_lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _read_folder(folder: Path) -> Iterator[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DifflmError(
            f"folder {folder} has no {' / '.join(TEXT_SUFFIXES)} files; point at a file or a text folder"
        )
    for file in files:
        yield from _read_text(file)


def read_jsonl_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield each JSON object of a JSONL file; skip and count broken lines, warning at the end.

    A broken line is invalid JSON or JSON that is not an object. Blank lines are not counted.
    A file with no valid object at all raises DifflmError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DifflmError(f"data file {path} not found; check the path (relative to {Path.cwd()})")
    return _records(path)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    n_ok, broken = 0, []
    for lineno, line in iter_decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            broken.append(lineno)
            continue
        n_ok += 1
        yield record
    if n_ok == 0:
        raise DifflmError(f"{path} has no JSON object lines; expected one {{...}} object per line")
    if broken:
        warnings.warn(
            f"{path}: skipped {len(broken)} broken line(s) (first at line {broken[0]})", stacklevel=3
        )


def pick_field(keys: Iterable[str], field: str | None, where: str) -> str:
    """Return `field` if present, else the first of TEXT_FIELDS present; DifflmError otherwise."""
    keys = list(keys)
    if field is not None:
        if field not in keys:
            raise DifflmError(
                f"field {field!r} not in {where} (it has {keys}); set data.field to one of them"
            )
        return field
    for name in TEXT_FIELDS:
        if name in keys:
            return name
    raise DifflmError(
        f"no text field in {where}: none of {list(TEXT_FIELDS)} among its keys {keys}; set data.field"
    )


def _as_text(value: Any, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DifflmError(
            f"field {field!r} in {where} is {type(value).__name__}, not text; choose a text field"
        )
    return value


def _read_jsonl(path: Path, field: str | None) -> Iterator[str]:
    chosen = None
    for record in read_jsonl_records(path):
        if chosen is None:
            chosen = pick_field(record, field, f"the first record of {path}")
        yield _as_text(record.get(chosen), chosen, str(path))


def _read_parquet(path: Path, field: str | None) -> Iterator[str]:
    pq = _require("pyarrow.parquet", "pyarrow")
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for non-Parquet bytes
        raise DifflmError(
            f"{path} is not a readable Parquet file ({e}); check the file or the format"
        ) from None
    column = pick_field(pfile.schema_arrow.names, field, f"the columns of {path}")
    for batch in pfile.iter_batches(batch_size=_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, column, str(path))


def _read_arrow(folder: Path, field: str | None, split: str) -> Iterator[str]:
    datasets = _require("datasets", "datasets")
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DifflmError(f"split {split!r} not in {folder} (it has {list(ds)}); set data.split")
        ds = ds[split]
    column = pick_field(ds.column_names, field, f"the columns of {folder}")
    for batch in ds.select_columns([column]).iter(batch_size=_BATCH_ROWS):
        for value in batch[column]:
            yield _as_text(value, column, str(folder))


def _read_hub(name: str, field: str | None, split: str) -> Iterator[str]:
    datasets = _require("datasets", "datasets")
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, bad split: all surface differently
        raise DifflmError(
            f"{name} does not exist locally and could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {e}); check the path, or go online for a hub dataset"
        ) from None
    column = None
    for record in ds:
        if column is None:
            column = pick_field(record, field, f"the first record of {name}")
        yield _as_text(record.get(column), column, name)


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DifflmError(f"reading this source needs {package}; pip install 'difflm[data]'") from None
