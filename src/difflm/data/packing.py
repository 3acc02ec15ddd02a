"""Pack a text stream into one flat token file, cut it into blocks, and order batches reproducibly.

`pack_to_file` streams texts through a tokenizer into a raw uint16/uint32 file (nanoGPT's
`train.bin`), with a JSON sidecar (`<file>.json`) recording what produced it so a later run can
reuse it (`packed_is_current`). `TokenBlocks` reads non-overlapping blocks from a token range of
that file through a memmap. `batch_order` is a pure function of (seed, epoch), so resuming at
batch k of an epoch (`iter_batches(start_batch=k)`) replays exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflm.data.tokenizers import Tokenizer
from difflm.errors import DifflmError

_FLUSH_TOKENS = 1 << 20
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    if dtype == "auto":
        return "uint16" if vocab_size < 65535 else "uint32"
    if dtype not in _DTYPES:
        raise DifflmError(f"unknown token dtype {dtype!r}; use auto, uint16 or uint32")
    if vocab_size - 1 > np.iinfo(_DTYPES[dtype]).max:
        raise DifflmError(f"vocab of {vocab_size} ids does not fit {dtype}; use dtype auto or uint32")
    return dtype


def pack_to_file(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    out_path: str | Path,
    *,
    append_eos: bool,
    dtype: str = "auto",
    source_fingerprint: str = "",
) -> int:
    """Tokenise `texts` in order into `out_path` (EOS after each text if asked); return n_tokens.

    Written to a temp file in the same folder and renamed, so a crash never leaves a half file
    that looks complete; the sidecar is written last for the same reason.
    """
    if append_eos and tokenizer.eos_token_id is None:
        raise DifflmError("append_eos needs a tokenizer with an EOS (or SEP) token; set append_eos false")
    dtype = choose_dtype(tokenizer.vocab_size, dtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_tokens = 0
    buf: list[int] = []
    with tempfile.NamedTemporaryFile(dir=out_path.parent, prefix=".tmp-", delete=False) as tmp:
        try:
            for text in texts:
                buf.extend(tokenizer.encode(text))
                if append_eos:
                    buf.append(tokenizer.eos_token_id)
                if len(buf) >= _FLUSH_TOKENS:
                    n_tokens += _flush(buf, tmp, dtype)
            n_tokens += _flush(buf, tmp, dtype)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if n_tokens == 0:
        os.unlink(tmp.name)
        raise DifflmError(f"no tokens to pack into {out_path}; the data source produced no text")
    os.replace(tmp.name, out_path)
    meta = {
        "n_tokens": n_tokens,
        "dtype": dtype,
        "append_eos": append_eos,
        "tokenizer": tokenizer.fingerprint(),
        "source": source_fingerprint,
    }
    # Atomic too: runs started side by side pack the same corpus at once and read each other's sidecar.
    fd, tmp_side = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_side, sidecar_path(out_path))
    return n_tokens


def _flush(buf: list[int], f: Any, dtype: str) -> int:
    n = len(buf)
    np.asarray(buf, dtype=_DTYPES[dtype]).tofile(f)
    buf.clear()
    return n


def read_packed_meta(path: str | Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not Path(path).is_file() or not side.is_file():
        raise DifflmError(
            f"packed token file {path} or its sidecar {side.name} is missing; pack the data again"
        )
    return json.loads(side.read_text(encoding="utf-8"))


def packed_is_current(
    path: str | Path, tokenizer: Tokenizer, source_fingerprint: str, append_eos: bool
) -> bool:
    """True when `path` was packed from the same source, tokenizer and EOS setting (reuse it)."""
    try:
        meta = read_packed_meta(path)
    except (DifflmError, json.JSONDecodeError):
        return False
    return (
        meta.get("tokenizer") == tokenizer.fingerprint()
        and meta.get("source") == source_fingerprint
        and meta.get("append_eos") == append_eos
    )


def fingerprint_source(path: str, **options: Any) -> str:
    """Hash of a source's location, file sizes and mtimes plus read options (format, field...).

    Cheap (no reading of content): good enough to notice an edited or replaced file.
    """
    p = Path(path).expanduser()
    parts: list[Any] = [str(p.resolve()) if p.exists() else path, sorted(options.items())]
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
    for q in files:
        st = q.stat()
        parts.append([str(q.relative_to(p)) if p.is_dir() else q.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode("utf-8")).hexdigest()[:16]


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `block_size` tokens from the token range [start, end) of a packed file.

    Item i is tokens [start + i*block_size, start + (i+1)*block_size) as a LongTensor [block_size];
    the tail shorter than a block is dropped. The memmap opens lazily so DataLoader workers do not
    pickle the array.
    """

    def __init__(self, path: str | Path, block_size: int, start: int = 0, end: int | None = None) -> None:
        meta = read_packed_meta(path)
        self.path, self.dtype = Path(path), meta["dtype"]
        end = meta["n_tokens"] if end is None else end
        if block_size < 1:
            raise DifflmError(f"block size must be positive, got {block_size}; set data.block_size")
        if not 0 <= start <= end <= meta["n_tokens"]:
            raise DifflmError(f"token range [{start}, {end}) is outside {path} ({meta['n_tokens']} tokens)")
        if block_size + 1 > end - start:
            raise DifflmError(
                f"block size {block_size} larger than the corpus/split of {end - start} tokens; "
                f"lower data.block_size or use more data"
            )
        self.block_size, self.start, self.end = block_size, start, end
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return (self.end - self.start) // self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=_DTYPES[self.dtype], mode="r")
        lo = self.start + i * self.block_size
        return torch.from_numpy(self._tokens[lo : lo + self.block_size].astype(np.int64))  # [block_size]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def split_ranges(n_tokens: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """First (1 - val_fraction) of the tokens train, the rest validation (nanoGPT's convention)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DifflmError(f"val_fraction must be in [0, 1), got {val_fraction}; set data.val_fraction")
    n_train = int(n_tokens * (1.0 - val_fraction))
    return (0, n_train), (n_train, n_tokens)


def batch_order(n_items: int, epoch: int, seed: int) -> torch.Tensor:
    """A permutation of range(n_items) that depends only on (seed, epoch): LongTensor [n_items]."""
    digest = hashlib.sha256(f"difflm-batch-order:{seed}:{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n_items, generator=g)


def length_grouped_order(lengths: torch.Tensor, batch_size: int, group: int, epoch: int, seed: int) -> torch.Tensor:
    """`batch_order` with similar lengths batched together, a permutation of range(len(lengths)).

    Each run of `group` batches of the shuffled order is sorted by length and cut into batches, and
    the whole batches are shuffled again: a batch's width (its longest item) falls towards the mean
    length, so padded positions stop costing compute, while the order still depends only on
    (seed, epoch). The items past the last whole batch stay at the end, as `batch_order` leaves them.
    """
    order = batch_order(len(lengths), epoch, seed)
    chunk = batch_size * group
    order = torch.cat([part[torch.argsort(lengths[part], stable=True)] for part in order.split(chunk)])
    n_batches = len(order) // batch_size
    whole = order[: n_batches * batch_size].view(n_batches, batch_size)
    shuffled = whole[batch_order(n_batches, epoch, seed + 1)].reshape(-1)
    return torch.cat([shuffled, order[n_batches * batch_size :]])


def iter_batches(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, epoch: int, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """Yield batches [batch_size, ...] in `batch_order`, skipping the first `start_batch` (resume).

    The last partial batch is dropped so every step sees the same batch shape.
    """
    n_items = len(dataset)  # type: ignore[arg-type]
    n_batches = n_items // batch_size if batch_size > 0 else 0
    if n_batches == 0:
        raise DifflmError(
            f"batch size {batch_size} gives no full batch from {n_items} blocks; lower batch_size or use more data"
        )
    if not 0 <= start_batch <= n_batches:
        raise DifflmError(
            f"start batch {start_batch} is outside this epoch's {n_batches} batches; check the resume state"
        )
    order = batch_order(n_items, epoch, seed)
    for b in range(start_batch, n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size].tolist()
        yield torch.stack([dataset[i] for i in idx])  # [batch_size, block_size]
