"""Tokenizers behind one small interface, each guaranteed to have a mask and a pad token.

Masked diffusion needs a `[MASK]` id even when the base tokenizer (e.g. Qwen3's) has none, so
`HFTokenizer` adds one and records `added_mask_token` / `added_pad_token`: the caller must then
resize the model's embedding to `vocab_size`. `CharTokenizer` is the nanoGPT-style character
vocabulary built from the corpus itself.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from difflm.errors import DifflmError

TOKENIZER_FILE = "tokenizer.json"
HF_MASK_TOKEN = "<|mask|>"
HF_PAD_TOKEN = "<|pad|>"


class Tokenizer(ABC):
    """What the rest of difflm needs from a tokenizer."""

    vocab_size: int
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int | None
    bos_token_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    @property
    @abstractmethod
    def special_ids(self) -> set[int]: ...

    @abstractmethod
    def save(self, directory: str | Path) -> None: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash that changes whenever encoding would change (keys packed-token caches)."""


class CharTokenizer(Tokenizer):
    """One id per character (sorted), then the specials [MASK], [PAD], [EOS]; no BOS.

    An unseen character raises DifflmError instead of mapping to an [UNK] id: for a character
    model a silent [UNK] hides a vocabulary built from the wrong corpus.
    """

    SPECIALS = ("[MASK]", "[PAD]", "[EOS]")

    def __init__(self, chars: Iterable[str], specials: Sequence[str] = SPECIALS) -> None:
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise DifflmError("a char tokenizer's chars must be single characters; rebuild it from text")
        if list(specials) != list(self.SPECIALS):
            raise DifflmError(f"char tokenizer specials must be {list(self.SPECIALS)}, got {list(specials)}")
        self.specials = list(specials)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._tokens = self.chars + self.specials
        n = len(self.chars)
        self.mask_token_id, self.pad_token_id, self.eos_token_id = n, n + 1, n + 2
        self.bos_token_id = None
        self.vocab_size = len(self._tokens)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise DifflmError("cannot build a char tokenizer from no text; check the data source")
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise DifflmError(
                f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary; "
                f"rebuild the tokenizer from text that contains it"
            ) from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        n = len(self.chars)
        return "".join(self._tokens[i] for i in ids if not (skip_special_tokens and i >= n))

    @property
    def special_ids(self) -> set[int]:
        return {self.mask_token_id, self.pad_token_id, self.eos_token_id}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"type": "char", "chars": "".join(self.chars), "specials": self.specials}
        (directory / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    def fingerprint(self) -> str:
        payload = json.dumps(["char", self.chars, self.specials], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer with a mask and a pad token ensured (never remote code).

    BERT-style tokenizers have no EOS; their [SEP] separates documents instead.
    """

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.added_mask_token = tok.mask_token_id is None
        if self.added_mask_token:
            tok.add_special_tokens({"mask_token": HF_MASK_TOKEN})
        self.added_pad_token = False
        if tok.pad_token_id is None:
            if tok.eos_token_id is not None:
                tok.pad_token = tok.eos_token
            else:
                tok.add_special_tokens({"pad_token": HF_PAD_TOKEN})
                self.added_pad_token = True
        self.mask_token_id = tok.mask_token_id
        self.pad_token_id = tok.pad_token_id
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.bos_token_id = tok.bos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> HFTokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        except Exception as e:  # missing path, offline hub, or an unsupported tokenizer
            raise DifflmError(
                f"cannot load tokenizer {name_or_path!r} ({type(e).__name__}: {e}); give a local "
                f"tokenizer folder, an HF model name when online, or 'char'"
            ) from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Including added tokens, so it is the embedding size the model needs at least."""
        return len(self.tok)

    @property
    def added_tokens(self) -> bool:
        """True when ids were added, so the model's embedding must be resized to `vocab_size`."""
        return self.added_mask_token or self.added_pad_token

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def special_ids(self) -> set[int]:
        return set(self.tok.all_special_ids)

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))

    def fingerprint(self) -> str:
        backend = getattr(self.tok, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else json.dumps(sorted(self.tok.get_vocab().items()))
        ids = [self.mask_token_id, self.pad_token_id, self.eos_token_id, self.bos_token_id]
        payload = json.dumps([type(self.tok).__name__, body, ids])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def build_tokenizer(spec: str, texts: Iterable[str] | None = None) -> Tokenizer:
    """ "char" builds a character vocabulary from `texts`; anything else is an HF path or name."""
    if spec == "char":
        if texts is None:
            raise DifflmError("the 'char' tokenizer is built from the training text; pass the texts")
        return CharTokenizer.from_texts(texts)
    return HFTokenizer.from_pretrained(spec)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what `Tokenizer.save` wrote, telling the char format from an HF one by its JSON."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DifflmError(f"{path} is not valid JSON ({e}); re-save the tokenizer") from None
        if isinstance(data, dict) and data.get("type") == "char":
            return CharTokenizer(data["chars"], data.get("specials", CharTokenizer.SPECIALS))
    if path.is_file() or (directory / "tokenizer_config.json").is_file():
        return HFTokenizer.from_pretrained(str(directory))
    raise DifflmError(
        f"no tokenizer in {directory} (no {TOKENIZER_FILE} or tokenizer_config.json); check the path"
    )
