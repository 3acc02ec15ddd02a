"""Named corpora ("shakespeare") resolved to a verified local file, downloading only as a last resort.

A name is looked up, in order, in: the `local` argument, $DIFFLM_DATA_DIR, `../shared/data/` next
to the working directory and next to the repository, and the cache `~/.cache/difflm/corpora/`.
Every file found is checked against the corpus md5, so a truncated or different file never trains
silently. Downloads go to a temp file in the cache and are renamed only once verified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from difflm.errors import DifflmError


@dataclass(frozen=True)
class Corpus:
    filename: str
    url: str
    md5: str


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        md5="6fb458f1232090904fb40fe944165e91",
    ),
}

_DOWNLOAD_TIMEOUT_S = 30


def cache_dir() -> Path:
    """The download cache; honours $XDG_CACHE_HOME like other tools."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "difflm" / "corpora"


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path, corpus: Corpus) -> Path:
    found = md5_of(path)
    if found != corpus.md5:
        raise DifflmError(
            f"{path} has md5 {found} but {corpus.filename} should have md5 {corpus.md5}; "
            f"replace it with the original file or delete it to download again"
        )
    return path


def _repo_shared_dir() -> Path | None:
    """`../shared/data` beside the repository, when difflm runs from a source checkout (src layout)."""
    src = Path(__file__).resolve().parents[2]
    return src.parent.parent / "shared" / "data" if src.name == "src" else None


def search_dirs(local: str | None = None) -> list[Path]:
    """The folders searched for a corpus file, in order (a `local` file counts as its folder)."""
    dirs: list[Path] = []
    if local is not None:
        p = Path(local).expanduser()
        dirs.append(p.parent if p.is_file() else p)
    if os.environ.get("DIFFLM_DATA_DIR"):
        dirs.append(Path(os.environ["DIFFLM_DATA_DIR"]).expanduser())
    dirs.append(Path.cwd().parent / "shared" / "data")
    repo_dir = _repo_shared_dir()
    if repo_dir is not None:
        dirs.append(repo_dir)
    dirs.append(cache_dir())
    return list(dict.fromkeys(d.resolve() for d in dirs))  # in order, each folder once


def _find_local(corpus: Corpus, local: str | None) -> Path | None:
    if local is not None and Path(local).expanduser().is_file():
        return Path(local).expanduser()
    for folder in search_dirs(local):
        if (folder / corpus.filename).is_file():
            return folder / corpus.filename
    return None


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise DifflmError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def resolve_corpus(name_or_path: str, *, local: str | None = None) -> Path:
    """An existing path as is; a corpus name as a verified local file (downloaded if none is found)."""
    if Path(name_or_path).expanduser().exists():
        return Path(name_or_path).expanduser()
    if name_or_path not in CORPORA:
        raise DifflmError(
            f"data file {name_or_path} not found and it is not a corpus name "
            f"(known: {', '.join(sorted(CORPORA))}); check the path"
        )
    corpus = CORPORA[name_or_path]
    found = _find_local(corpus, local)
    if found is not None:
        return verify_md5(found, corpus)
    return _download(name_or_path, corpus, local)


def fetch_corpus(name: str, source: str | None = None) -> Path:
    """Put a verified copy of corpus `name` in the cache, from the file `source` or the internet."""
    corpus = get_corpus(name)
    target = cache_dir() / corpus.filename
    if source is None:
        if target.is_file():
            return verify_md5(target, corpus)
        return _download(name, corpus, None)
    src = Path(source).expanduser()
    if src.is_dir():
        src = src / corpus.filename
    if not src.is_file():
        raise DifflmError(f"data file {src} not found; point --from at a copy of {corpus.filename}")
    verify_md5(src, corpus)
    if src.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as tmp:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, tmp)
        os.replace(tmp.name, target)
    return target


def _download(name: str, corpus: Corpus, local: str | None) -> Path:
    target = cache_dir() / corpus.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False)
    try:
        with tmp, urllib.request.urlopen(corpus.url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, tmp)
        verify_md5(Path(tmp.name), corpus)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        Path(tmp.name).unlink(missing_ok=True)
        looked = ", ".join(str(d) for d in search_dirs(local))
        raise DifflmError(
            f"corpus {name!r} ({corpus.filename}) not found in {looked} and downloading {corpus.url} "
            f"failed ({e}); point at a local copy with --from PATH or DIFFLM_DATA_DIR"
        ) from None
    except DifflmError:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    os.replace(tmp.name, target)
    return target
