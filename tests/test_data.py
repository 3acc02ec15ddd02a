"""Data layer: every source kind, corpus resolution with checksums, tokenizers, packing and batching."""

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from difflm.data import corpora, packing, sources
from difflm.data.corpora import Corpus, fetch_corpus, resolve_corpus
from difflm.data.packing import (
    TokenBlocks,
    batch_order,
    iter_batches,
    length_grouped_order,
    pack_to_file,
    packed_is_current,
    split_ranges,
)
from difflm.data.sources import iter_texts, read_jsonl_records
from difflm.data.tokenizers import CharTokenizer, HFTokenizer, build_tokenizer, load_tokenizer
from difflm.errors import DifflmError

DOCS = ["the cat sat.", "a dog ran!", "snow falls\non hills"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- sources


def test_text_file_streams_in_line_chunks_that_rejoin_exactly(tmp_path, monkeypatch):
    text = "".join(f"line {i} é\n" for i in range(50))
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    assert list(iter_texts(str(path))) == [text]
    monkeypatch.setattr(sources, "CHUNK_CHARS", 40)
    chunks = list(iter_texts(str(path)))
    assert len(chunks) > 5 and "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)


def test_lines_format_yields_one_document_per_line(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("one\n\ntwo\r\nthree", encoding="utf-8")
    assert list(iter_texts(str(path), format="lines")) == ["one", "two", "three"]


def test_folder_reads_txt_and_md_recursively_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("third", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b" / "y.txt").write_text("second", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert list(iter_texts(str(tmp_path))) == ["first", "second", "third"]


def test_jsonl_auto_detects_field_and_honours_explicit_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"title": f"t{i}", "content": d} for i, d in enumerate(DOCS)])
    assert list(iter_texts(str(path))) == DOCS
    assert list(iter_texts(str(path), field="title")) == ["t0", "t1", "t2"]


def test_jsonl_without_text_field_lists_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"src": "a", "tgt": "b"}])
    with pytest.raises(DifflmError, match=r"\['src', 'tgt'\]"):
        list(iter_texts(str(path)))
    with pytest.raises(DifflmError, match="field 'body' not in"):
        list(iter_texts(str(path), field="body"))


def test_read_jsonl_records_skips_and_reports_broken_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n\n[1, 2]\n{"a": 2}\n', encoding="utf-8")
    with pytest.warns(UserWarning, match=r"skipped 2 broken line\(s\) \(first at line 2\)"):
        assert list(read_jsonl_records(path)) == [{"a": 1}, {"a": 2}]


def test_parquet_column_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "text": DOCS}), path, row_group_size=2)
    assert list(iter_texts(str(path))) == DOCS
    with pytest.raises(DifflmError, match="is int"):
        list(iter_texts(str(path), field="id"))


def test_arrow_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": DOCS, "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert list(iter_texts(str(tmp_path / "one"))) == DOCS
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"sentence": ["x"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(iter_texts(str(tmp_path / "dict"), split="test")) == ["x"]
    with pytest.raises(DifflmError, match="split 'dev' not in"):
        list(iter_texts(str(tmp_path / "dict"), split="dev"))


def test_hub_name_offline_says_not_local_and_hub_unreachable(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DifflmError, match="does not exist locally.*hub"):
        list(iter_texts("someone/some_corpus"))


def test_hub_dataset_streams_the_detected_field(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake(name, split, streaming):
        seen.update(name=name, split=split, streaming=streaming)
        return iter([{"document": d} for d in DOCS])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_texts("wikitext", split="validation")) == DOCS
    assert seen == {"name": "wikitext", "split": "validation", "streaming": True}


def test_missing_empty_and_non_utf8_files_raise_helpful_errors(tmp_path):
    with pytest.raises(DifflmError, match="data file .*nope.txt not found"):
        iter_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(DifflmError, match="data file ./missing/data not found"):
        iter_texts("./missing/data")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DifflmError, match="no text found"):
        list(iter_texts(str(tmp_path / "empty.txt")))
    (tmp_path / "latin.txt").write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(
        DifflmError, match=r"latin.txt is not valid UTF-8.*byte offset 11 \(line 2\).*re-encode"
    ):
        list(iter_texts(str(tmp_path / "latin.txt")))
    with pytest.raises(DifflmError, match="unknown data format"):
        iter_texts(str(tmp_path / "latin.txt"), format="csv")


# ---------------------------------------------------------------- corpora


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    body = b"to be or not to be\n"
    (data / "tiny.txt").write_bytes(body)
    corpus = Corpus(filename="tiny.txt", url="http://127.0.0.1:9/tiny.txt", md5=hashlib.md5(body).hexdigest())
    monkeypatch.setattr(corpora, "CORPORA", {"tiny": corpus})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return data


def test_resolve_corpus_finds_local_copies_and_verifies_md5(tiny_corpus, tmp_path, monkeypatch):
    assert resolve_corpus("tiny", local=str(tiny_corpus)) == tiny_corpus / "tiny.txt"
    assert resolve_corpus("tiny", local=str(tiny_corpus / "tiny.txt")) == tiny_corpus / "tiny.txt"
    monkeypatch.setenv("DIFFLM_DATA_DIR", str(tiny_corpus))
    assert resolve_corpus("tiny") == tiny_corpus / "tiny.txt"
    assert resolve_corpus(str(tiny_corpus / "tiny.txt")) == tiny_corpus / "tiny.txt"


def test_resolve_corpus_md5_mismatch_names_both_checksums(tiny_corpus):
    (tiny_corpus / "tiny.txt").write_bytes(b"something else\n")
    expected = corpora.CORPORA["tiny"].md5
    found = hashlib.md5(b"something else\n").hexdigest()
    with pytest.raises(DifflmError, match=f"md5 {found}.*md5 {expected}"):
        resolve_corpus("tiny", local=str(tiny_corpus))


def test_resolve_corpus_download_failure_says_where_it_looked(tiny_corpus, tmp_path):
    with pytest.raises(DifflmError, match=r"not found in .*cache.*--from PATH or DIFFLM_DATA_DIR"):
        resolve_corpus("tiny", local=str(tmp_path / "elsewhere"))
    assert not list((tmp_path / "cache" / "difflm" / "corpora").iterdir())  # no temp file left
    with pytest.raises(DifflmError, match="not a corpus name"):
        resolve_corpus("nonexistent")


def test_fetch_corpus_copies_a_verified_file_into_the_cache(tiny_corpus, tmp_path):
    cached = fetch_corpus("tiny", source=str(tiny_corpus / "tiny.txt"))
    assert cached == tmp_path / "cache" / "difflm" / "corpora" / "tiny.txt"
    assert cached.read_bytes() == b"to be or not to be\n"
    assert fetch_corpus("tiny") == cached
    (tmp_path / "bad.txt").write_bytes(b"bad")
    with pytest.raises(DifflmError, match="should have md5"):
        fetch_corpus("tiny", source=str(tmp_path / "bad.txt"))


def test_shakespeare_entry_matches_the_shared_copy():
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not shared.is_file():
        pytest.skip("no shared data folder beside the repository")
    assert corpora.md5_of(shared) == corpora.CORPORA["shakespeare"].md5


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_specials(tmp_path):
    tok = CharTokenizer.from_texts(DOCS)
    chars = sorted(set("".join(DOCS)))
    assert tok.encode("cat") == [chars.index("c"), chars.index("a"), chars.index("t")]
    assert tok.decode(tok.encode(DOCS[2])) == DOCS[2]
    n = len(chars)
    assert (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (n, n + 1, n + 2, n + 3)
    assert tok.special_ids == {n, n + 1, n + 2} and tok.bos_token_id is None
    assert tok.decode([0, n, n + 2]) == chars[0] + "[MASK][EOS]"
    assert tok.decode([0, n], skip_special_tokens=True) == chars[0]
    with pytest.raises(DifflmError, match=r"'Z' \(U\+005A\)"):
        tok.encode("Zebra")
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["type"] == "char"
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.fingerprint() == tok.fingerprint() != CharTokenizer.from_texts(["xyz"]).fingerprint()


def make_hf_tokenizer_dir(tmp_path: Path, with_eos: bool) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "</s>": 4}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "</s>"} if with_eos else {}
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", **extra).save_pretrained(str(tmp_path))
    return tmp_path


def test_hf_tokenizer_gets_mask_added_and_pad_from_eos(tmp_path):
    tok = HFTokenizer.from_pretrained(str(make_hf_tokenizer_dir(tmp_path / "a", with_eos=True)))
    assert tok.added_mask_token and not tok.added_pad_token
    assert tok.mask_token_id == 5 and tok.vocab_size == 6
    assert tok.pad_token_id == tok.eos_token_id == 4
    assert tok.encode("the cat sat") == [1, 2, 3]
    assert tok.decode([1, 2, 5]) == "the cat <|mask|>"
    assert {4, 5} <= tok.special_ids
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert isinstance(again, HFTokenizer) and not again.added_mask_token and again.mask_token_id == 5
    assert again.fingerprint() == tok.fingerprint()


def test_hf_tokenizer_without_eos_gets_a_pad_token_added(tmp_path):
    tok = build_tokenizer(str(make_hf_tokenizer_dir(tmp_path, with_eos=False)))
    assert tok.added_mask_token and tok.added_pad_token and tok.added_tokens
    assert len({tok.mask_token_id, tok.pad_token_id}) == 2 and tok.vocab_size == 7
    with pytest.raises(DifflmError, match="cannot load tokenizer"):
        build_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DifflmError, match="pass the texts"):
        build_tokenizer("char")


# ---------------------------------------------------------------- packing and batching


def pack(tmp_path: Path, texts=DOCS, append_eos=True):
    tok = CharTokenizer.from_texts(texts)
    path = tmp_path / "train.bin"
    n = pack_to_file(iter(texts), tok, path, append_eos=append_eos, source_fingerprint="src1")
    return tok, path, n


def test_pack_round_trip_with_eos_and_sidecar(tmp_path):
    tok, path, n = pack(tmp_path)
    assert n == sum(len(d) + 1 for d in DOCS)
    blocks = TokenBlocks(path, block_size=1)
    ids = torch.cat([blocks[i] for i in range(len(blocks))]).tolist()
    assert tok.decode(ids) == "[EOS]".join(DOCS) + "[EOS]"
    meta = json.loads((tmp_path / "train.bin.json").read_text())
    assert meta == {
        "n_tokens": n,
        "dtype": "uint16",
        "append_eos": True,
        "tokenizer": tok.fingerprint(),
        "source": "src1",
    }
    assert packed_is_current(path, tok, "src1", append_eos=True)
    assert not packed_is_current(path, tok, "src2", append_eos=True)
    assert not packed_is_current(path, tok, "src1", append_eos=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.bin.json"]  # no temp left


def test_pack_sidecar_is_never_seen_half_written(tmp_path):
    """Two runs started side by side pack the same corpus at once; a reader must always find a whole
    sidecar (reproduce.py's two training processes once failed on an empty one)."""
    tok, path, _ = pack(tmp_path)
    stop = threading.Event()

    def repack():
        while not stop.is_set():
            pack_to_file(iter(DOCS), tok, path, append_eos=True, source_fingerprint="src1")

    writer = threading.Thread(target=repack)
    writer.start()
    try:
        for _ in range(2000):
            assert packing.read_packed_meta(path)["source"] == "src1"
    finally:
        stop.set()
        writer.join()


def test_pack_dtype_choice_and_empty_input(tmp_path):
    assert packing.choose_dtype(65534) == "uint16" and packing.choose_dtype(65535) == "uint32"
    with pytest.raises(DifflmError, match="does not fit uint16"):
        packing.choose_dtype(70000, "uint16")
    tok = CharTokenizer.from_texts(["ab"])
    with pytest.raises(DifflmError, match="no tokens"):
        pack_to_file(iter([]), tok, tmp_path / "e.bin", append_eos=False)
    assert list(tmp_path.iterdir()) == []  # the temp file is cleaned up


def test_blocks_are_non_overlapping_and_cover_the_range(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(103))
    tok, path, n = pack(tmp_path, texts=[text], append_eos=False)
    all_ids = torch.tensor(tok.encode(text))
    blocks = TokenBlocks(path, block_size=10, start=3, end=n)
    assert len(blocks) == 10
    assert torch.equal(torch.cat([blocks[i] for i in range(len(blocks))]), all_ids[3:103])
    assert blocks[0].dtype == torch.long and blocks[0].shape == (10,)
    with pytest.raises(IndexError):
        blocks[10]
    with pytest.raises(DifflmError, match="block size 100 larger than the corpus/split of 100 tokens"):
        TokenBlocks(path, block_size=100, start=3, end=n)


def test_split_ranges_follow_the_nanogpt_convention():
    assert split_ranges(1000, 0.1) == ((0, 900), (900, 1000))
    assert split_ranges(1115394, 0.1) == ((0, 1003854), (1003854, 1115394))
    assert split_ranges(7, 0.0) == ((0, 7), (7, 7))
    with pytest.raises(DifflmError, match="val_fraction"):
        split_ranges(10, 1.0)


def test_batch_order_is_a_deterministic_permutation_per_seed_and_epoch():
    a = batch_order(50, epoch=0, seed=1)
    assert torch.equal(a, batch_order(50, epoch=0, seed=1))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, batch_order(50, epoch=1, seed=1))
    assert not torch.equal(a, batch_order(50, epoch=0, seed=2))


def test_length_grouped_order_batches_similar_lengths_and_stays_deterministic():
    lengths = torch.randint(1, 31, (103,), generator=torch.Generator().manual_seed(0))
    order = length_grouped_order(lengths, batch_size=8, group=4, epoch=1, seed=5)
    assert sorted(order.tolist()) == list(range(103))
    assert torch.equal(order, length_grouped_order(lengths, batch_size=8, group=4, epoch=1, seed=5))
    assert not torch.equal(order, length_grouped_order(lengths, batch_size=8, group=4, epoch=2, seed=5))
    plain = batch_order(103, epoch=1, seed=5)
    whole = 103 // 8 * 8
    width = lambda o: sum(int(lengths[b].max()) for b in o[:whole].view(-1, 8))  # noqa: E731
    assert width(order) < width(plain)  # less padding than the plain shuffle
    chunks = [set(part.tolist()) for part in plain.split(32)]  # each batch comes from one run of 4 batches
    assert all(any(set(b.tolist()) <= chunk for chunk in chunks) for b in order[:whole].view(-1, 8))
    group_one = length_grouped_order(lengths, batch_size=8, group=1, epoch=1, seed=5)
    assert {frozenset(b.tolist()) for b in group_one[:whole].view(-1, 8)} == {
        frozenset(b.tolist()) for b in plain[:whole].view(-1, 8)
    }  # a group of one batch only reorders within and among the plain batches


def test_iter_batches_resume_yields_exactly_the_tail(tmp_path):
    data = [torch.full((4,), i) for i in range(23)]
    full = list(iter_batches(data, batch_size=5, seed=3, epoch=2))
    assert len(full) == 4 and all(b.shape == (5, 4) for b in full)
    order = batch_order(23, epoch=2, seed=3)
    assert torch.equal(full[1][:, 0], order[5:10])
    tail = list(iter_batches(data, batch_size=5, seed=3, epoch=2, start_batch=3))
    assert len(tail) == 1 and torch.equal(tail[0], full[3])
    assert list(iter_batches(data, batch_size=5, seed=3, epoch=2, start_batch=4)) == []
    with pytest.raises(DifflmError, match="no full batch"):
        next(iter_batches(data, batch_size=24, seed=3, epoch=2))


def test_shakespeare_style_pipeline_end_to_end(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First Citizen:\nBefore we proceed.\n" * 20, encoding="utf-8")
    texts = list(iter_texts(str(path)))
    tok = build_tokenizer("char", texts)
    n = pack_to_file(texts, tok, tmp_path / "c.bin", append_eos=False)
    train, val = split_ranges(n, 0.1)
    train_blocks = TokenBlocks(tmp_path / "c.bin", 16, *train)
    batch = next(iter_batches(train_blocks, batch_size=4, seed=0, epoch=0))
    assert batch.shape == (4, 16) and int(batch.max()) < tok.mask_token_id
    assert len(TokenBlocks(tmp_path / "c.bin", 16, *val)) == (val[1] - val[0]) // 16
