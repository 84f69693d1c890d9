"""Reading text, sentence splitting, and the token cache: formats, round trip, errors, reuse, atomicity."""

import csv
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network, even if a name slips through
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pretrain import data  # noqa: E402
from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import (  # noqa: E402
    TokenCache,
    TokenSplit,
    prepare,
    read_documents,
    split_documents,
    split_sentences,
)
from pretrain.errors import UserError  # noqa: E402
from pretrain.tokenizer import N_SPECIAL, Tokenizer, train_tokenizer  # noqa: E402

MULTI = ["café", "naïve", "Zürich", "东京", "日本語", "😀", "🎉", "[MASK]", "<pad>", "<s>", "e.g.", "Mr."]


def make_docs(n_docs: int = 80, seed: int = 0) -> list[str]:
    """Deterministic documents of a few paragraphs of sentences, with accents, CJK, emoji and literal
    special strings."""
    rng = random.Random(seed)
    syl = ["ta", "ko", "ri", "men", "sol", "ex", "an", "der", "pro", "ver", "lin", "qu", "est", "ion"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(250)]
    words += ["the", "of", "and", "a", "to", "in", "is"] * 10 + MULTI
    docs = []
    for _ in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 3)):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(1, 4))]
            paras.append(" ".join(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]) for s in sents))
        docs.append("\n\n".join(paras))
    return docs


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Keep `datasets` offline and its cache inside tmp_path, even if another module imported it first."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """One tokenizer shared by the format tests (they pass it as data.tokenizer, which is that path's test)."""
    docs = make_docs()
    return str(train_tokenizer((s for d in docs for s in split_sentences(d)),
                               tmp_path_factory.mktemp("tok") / "t", 500, "unigram"))


def cfg_for(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def decoded_docs(prep) -> dict[str, list[str]]:
    """Every document of both splits, decoded from the cache."""
    out = {}
    for name in ("train", "valid"):
        s = prep.cache.split(name)
        out[name] = [prep.tokenizer.decode(s.tokens[s.doc_offsets[d]:s.doc_offsets[d + 1]]) for d in range(s.n_docs)]
    return out


def assert_round_trip(prep, docs: list[str], cfg: DataConfig) -> None:
    """Each split's decoded documents are exactly its documents, in corpus order."""
    is_valid = split_documents(len(docs), cfg.valid_fraction, cfg.split_seed)
    got = decoded_docs(prep)
    assert got["train"] == [d for d, v in zip(docs, is_valid, strict=True) if not v]
    assert got["valid"] == [d for d, v in zip(docs, is_valid, strict=True) if v]


# ---------------------------------------------------------------------------------------------- sentences


def test_split_sentences_rules():
    doc = ('Hello world. This is Mr. Smith, e.g. a man. He said "Stop." Then J. R. Tolkien left! '
           "3 apples. ok. Why? (Because.) Fine\n\nNew paragraph.  \n\n  Last one... Yes. 東京です。次の文！")
    got = split_sentences(doc)
    assert "".join(got) == doc
    assert got == ["Hello world.", " This is Mr. Smith, e.g. a man.", ' He said "Stop."',
                   " Then J. R. Tolkien left!", " 3 apples. ok.", " Why?", " (Because.)", " Fine",
                   "\n\nNew paragraph.", "  \n\n  Last one...", " Yes.", " 東京です。", "次の文！"]
    assert split_sentences("  \n ") == ["  \n "]
    assert split_sentences("One.\n\n") == ["One.\n\n"]


def test_split_sentences_concatenates_back_on_random_documents():
    for doc in make_docs(40, seed=3):
        sents = split_sentences(doc)
        assert "".join(sents) == doc and all(s.strip() for s in sents)
        assert len(sents) >= doc.count("\n\n") + 1  # paragraph breaks are boundaries


def test_split_documents_is_seeded_and_keeps_both_splits():
    a = split_documents(100, 0.1, 7)
    assert a.sum() == 10 and (a == split_documents(100, 0.1, 7)).all() and (a != split_documents(100, 0.1, 8)).any()
    assert split_documents(2, 0.01, 0).sum() == 1 and split_documents(3, 0.49, 0).sum() == 1
    with pytest.raises(UserError, match="needs at least 2"):
        split_documents(1, 0.1, 0)


# ------------------------------------------------------------------------------------ round trip and cache


def test_round_trip_multilingual_and_literal_specials(tmp_path):
    docs = make_docs()
    docs[0] = "Literal [MASK] and <pad> and <s> stay text. Ünïcödé 東京 😀!\n\n  Indented\tparagraph.\n"
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = cfg_for(tmp_path, tmp_path / "c.jsonl", vocab_size=500, valid_fraction=0.1)
    prep = prepare(cfg, progress=False)
    assert read_documents(cfg) == docs
    assert_round_trip(prep, docs, cfg)
    for name in ("train", "valid"):
        s = prep.cache.split(name)
        assert int(np.asarray(s.tokens).min()) >= N_SPECIAL  # literal "[MASK]"/"<pad>" never became special ids
        assert np.isin(s.doc_offsets, s.sent_offsets).all()  # every document start is a sentence start
        assert s.sent_offsets[-1] == s.doc_offsets[-1] == len(s.tokens)
    # Decoding each sentence gives that sentence's text.
    s = prep.cache.split("train")
    train_docs = decoded_docs(prep)["train"]
    first = s.doc_first_sent
    for d in range(s.n_docs):
        want = split_sentences(train_docs[d])
        got = [prep.tokenizer.decode(s.tokens[s.sent_offsets[j]:s.sent_offsets[j + 1]])
               for j in range(first[d], first[d + 1])]
        assert got == want
    st = prep.stats
    assert st["reused"] is False and st["documents"] == len(docs)
    assert st["tokens"] == len(s.tokens) + len(prep.cache.split("valid").tokens)
    assert st["train"]["documents"] + st["valid"]["documents"] == len(docs) and st["valid"]["documents"] == 8
    assert st["bytes"] == sum(len(d.encode()) for d in docs) and st["tokens_per_s"] > 0
    assert st["sentences"] == sum(len(split_sentences(d)) for d in docs)
    meta = prep.cache.meta
    assert meta["tokenizer"]["sha256"] == prep.tokenizer.sha256 and meta["dtype"] == "uint16"
    assert isinstance(s, TokenSplit) and s.n_bytes == st["train"]["bytes"]


def write_formats(tmp_path, docs):
    """The same documents as each supported file kind; returns {kind: (source, extra config)}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    (d / "folder" / "sub").mkdir(parents=True)
    flat = [x.replace("\n\n", " ") for x in docs]  # one paragraph each
    (d / "block.txt").write_text("\n\n".join(flat))
    (d / "lines.txt").write_text("\n".join(flat) + "\n")
    (d / "rows.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs)))
    (d / "list.json").write_text(json.dumps([{"text": t} for t in docs]))
    (d / "wrapped.json").write_text(json.dumps({"version": 1, "data": [{"text": t} for t in docs]}))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), d / "table.parquet")
    half = len(docs) // 2
    (d / "folder" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:half]))
    (d / "folder" / "sub" / "b.txt").write_text("\r\n\r\n".join(flat[half:]))  # CRLF line breaks too
    (d / "folder" / ".hidden.txt").write_text("ignored")
    (d / "folder" / "notes.md").write_text("ignored: not a data file type")
    return {
        "txt-block": (d / "block.txt", {}, flat),
        "txt-line": (d / "lines.txt", {"doc_per": "line"}, flat),
        "jsonl": (d / "rows.jsonl", {"text_field": "body"}, docs),
        "json-list": (d / "list.json", {}, docs),
        "json-wrapped": (d / "wrapped.json", {}, docs),
        "parquet": (d / "table.parquet", {}, docs),
        "folder": (d / "folder", {}, docs[:half] + flat[half:]),
        "glob": (d / "folder" / "**" / "*.*", {}, docs[:half] + flat[half:]),
    }


KINDS = ["txt-block", "txt-line", "jsonl", "json-list", "json-wrapped", "parquet", "folder", "glob"]


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_reads_every_local_format(tmp_path, tok_path, kind):
    source, extra, want = write_formats(tmp_path, make_docs(30, seed=5))[kind]
    cfg = cfg_for(tmp_path, source, tokenizer=tok_path, **extra)
    assert read_documents(cfg) == want
    prep = prepare(cfg, progress=False)
    assert_round_trip(prep, want, cfg)
    assert prep.tokenizer.path == Tokenizer.load(tok_path).path


def test_datasets_path_with_a_local_folder_and_a_saved_dataset(tmp_path, tok_path):
    """A folder without .txt/.jsonl/.json/.parquet files goes to datasets.load_dataset (CSV here); a
    save_to_disk folder to datasets.load_from_disk. Both are the real `datasets` code paths, offline."""
    import datasets

    docs = make_docs(12, seed=9)
    (tmp_path / "csvs").mkdir()
    with open(tmp_path / "csvs" / "part.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"]] + [[t, 1] for t in docs])
    cfg = cfg_for(tmp_path, tmp_path / "csvs", tokenizer=tok_path, dataset_split="train")
    assert read_documents(cfg) == docs
    assert_round_trip(prepare(cfg, progress=False), docs, cfg)

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:5]}),
                          "test": datasets.Dataset.from_dict({"text": docs[5:]})}).save_to_disk(tmp_path / "saved")
    assert read_documents(cfg_for(tmp_path, tmp_path / "saved", dataset_split="test")) == docs[5:]
    with pytest.raises(UserError, match="has no column 'body'.*columns: text"):
        read_documents(cfg_for(tmp_path, tmp_path / "saved", text_field="body"))
    with pytest.raises(UserError, match="could not load dataset 'no-such-user/no-such-dataset'"):
        read_documents(cfg_for(tmp_path, "no-such-user/no-such-dataset"))


# ------------------------------------------------------------------------------------------- bad inputs


def bad_inputs(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.txt").write_text("  \n\n ")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "garbage.txt").write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4000)))
    (d / "badline.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "nofield.jsonl").write_text('{"body": "a", "id": 1}\n')
    (d / "one.txt").write_text("Only one document here.\nStill the same block.")
    (d / "notparquet.parquet").write_text("plain text")
    return {
        "missing": (d / "nope.txt", ["no such file", "nope.txt"]),
        "empty": (d / "empty.txt", ["empty.txt is empty", "no text"]),
        "binary": (d / "binary.txt", ["binary.txt is not a text file"]),
        "mostly-invalid": (d / "garbage.txt", ["garbage.txt is not a text file", "not UTF-8"]),
        "bad-json-line": (d / "badline.jsonl", ["badline.jsonl:2", "line 2 is not JSON"]),
        "no-text-field": (d / "nofield.jsonl", ["no field 'text'", "fields: body, id", "--set data.text_field="]),
        "one-document": (d / "one.txt", ["1 document", "at least 2"]),
        "not-parquet": (d / "notparquet.parquet", ["not a readable Parquet file"]),
        "glob-no-match": (d / "*.xyz", ["no .txt/.jsonl/.json/.parquet files match"]),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "mostly-invalid", "bad-json-line",
                                  "no-text-field", "one-document", "not-parquet", "glob-no-match"])
def test_bad_input_is_one_line_user_error_and_writes_nothing(tmp_path, case):
    source, words = bad_inputs(tmp_path)[case]
    cfg = cfg_for(tmp_path, source, vocab_size=400)
    with pytest.raises(UserError) as e:
        prepare(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "cache").exists()


def test_vocab_size_too_large_writes_nothing(tmp_path):
    (tmp_path / "small.txt").write_text("A small corpus. With few words.\n\nAnother block of text here.")
    with pytest.raises(UserError, match=r"vocabulary size 8000 is too large.*give more text"):
        prepare(cfg_for(tmp_path, tmp_path / "small.txt", vocab_size=8000), progress=False)
    assert not (tmp_path / "cache").exists()


def test_user_tokenizer_lacking_specials_is_named(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_docs(30)), model_writer=model, vocab_size=200,
                                   minloglevel=2, control_symbols=["[CLS]"])
    (tmp_path / "user.model").write_bytes(model.getvalue())
    (tmp_path / "c.txt").write_text("\n\n".join(make_docs(5)))
    with pytest.raises(UserError, match=r"lacks the special pieces.*missing: <pad>, \[SEP\], \[MASK\]"):
        prepare(cfg_for(tmp_path, tmp_path / "c.txt", tokenizer=str(tmp_path / "user.model")), progress=False)
    assert not (tmp_path / "cache").exists()


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tok_path):
    text = "\n\n".join(d.replace("\n\n", " ") for d in make_docs(6)).encode()
    text += b"\n\nLatin-1 caf\xe9 and na\xefve. Fine."
    (tmp_path / "mixed.txt").write_bytes(text)
    cfg = cfg_for(tmp_path, tmp_path / "mixed.txt", tokenizer=tok_path)
    stats = {}
    docs = read_documents(cfg, stats)
    assert stats["replaced_bytes"] == 2 and docs[-1] == "Latin-1 caf\ufffd and na\ufffdve. Fine."
    prep = prepare(cfg, progress=False)
    assert prep.stats["replaced_bytes"] == 2
    assert_round_trip(prep, docs, cfg)


# ------------------------------------------------------------------------------------ reuse and atomicity


def test_reuse_and_rebuild_when_inputs_change(tmp_path, tok_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(20)))
    cfg = cfg_for(tmp_path, src, vocab_size=450)
    first = prepare(cfg, progress=False)
    t = time.perf_counter()
    again = prepare(cfg, progress=False)
    assert time.perf_counter() - t < 2.0
    assert again.stats["reused"] is True and again.cache.path == first.cache.path
    assert again.tokenizer.sha256 == first.tokenizer.sha256
    assert again.stats["tokens"] == first.stats["tokens"]
    src.write_text("\n\n".join(make_docs(20, seed=1)))  # same name, new content
    changed = prepare(cfg, progress=False)
    assert changed.stats["reused"] is False and changed.cache.path != first.cache.path
    assert changed.tokenizer.sha256 != first.tokenizer.sha256  # trained on the new corpus
    resplit = prepare(cfg_for(tmp_path, src, vocab_size=450, valid_fraction=0.3), progress=False)
    assert resplit.stats["reused"] is False and resplit.tokenizer.sha256 == changed.tokenizer.sha256
    given = prepare(cfg_for(tmp_path, src, tokenizer=tok_path), progress=False)
    assert given.stats["reused"] is False and given.cache.path != changed.cache.path


def test_interrupted_build_leaves_nothing_trusted(tmp_path, tok_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(20)))
    cfg = cfg_for(tmp_path, src, tokenizer=tok_path)
    calls = []

    def fail_after_train_split(lengths):  # dies while writing, after train.bin and its offsets exist
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    monkeypatch.setattr(data, "_offsets", fail_after_train_split)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.undo()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir()] == []  # no key folder and no temporary folder left

    # A killed process leaves a temporary folder: it is never trusted, and cleaned up once its pid is gone.
    stale = cache / ".tmp-0123abcd-999999999"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 10)
    prep = prepare(cfg, progress=False)
    assert prep.stats["reused"] is False and not stale.exists()

    # A key folder without meta.json (not made by prepare) is refused by TokenCache.open and rebuilt.
    (prep.cache.path / "meta.json").unlink()
    with pytest.raises(UserError, match="not a complete token cache"):
        TokenCache.open(prep.cache.path)
    rebuilt = prepare(cfg, progress=False)
    assert rebuilt.stats["reused"] is False and TokenCache.open(rebuilt.cache.path).meta["splits"]


def test_open_rejects_corrupt_cache(tmp_path, tok_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(10)))
    prep = prepare(cfg_for(tmp_path, src, tokenizer=tok_path), progress=False)
    path = prep.cache.path
    with open(path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="corrupt"):
        TokenCache.open(path)
    with pytest.raises(UserError, match="unreadable"):
        (path / "meta.json").write_text("{")
        TokenCache.open(path)


# ----------------------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_cache_round_trip_and_fast_reuse(tmp_path):
    """The one test that builds the full built-in corpus cache (default vocab 8000, unigram)."""
    from pretrain import corpus

    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    t = time.perf_counter()
    prep = prepare(cfg, progress=False)
    build = time.perf_counter() - t
    t = time.perf_counter()
    again = prepare(cfg, progress=False)
    reuse = time.perf_counter() - t
    print(f"\nbuilt-in corpus: build {build:.1f} s, reuse {reuse:.2f} s, {prep.stats['documents']} documents, "
          f"{prep.stats['sentences']} sentences, {prep.stats['tokens']} tokens")
    assert again.stats["reused"] is True and reuse < 2.0
    # Round trip without reading the corpus again: put the decoded documents back in corpus order and
    # compare with the sha256 of the text recorded at build time.
    got = decoded_docs(prep)
    is_valid = split_documents(prep.stats["documents"], cfg.valid_fraction, cfg.split_seed)
    train, valid = iter(got["train"]), iter(got["valid"])
    docs = [next(valid) if v else next(train) for v in is_valid]
    meta = prep.cache.meta
    assert meta["corpus"] == corpus.corpus_info(docs) and meta["corpus"]["python_version"]
    assert not any(line.lstrip().startswith(">>>") for d in docs for line in d.split("\n"))
    assert meta["source"]["kind"] == "builtin" and prep.tokenizer.size == 8000
    assert prep.stats["bytes"] > 1_000_000 and prep.stats["sentences"] > prep.stats["documents"]


def test_large_vocabulary_uses_uint32(tmp_path, tok_path, monkeypatch):
    """Vocabularies above 65536 pieces need uint32 tokens (simulated: the size is all _build looks at)."""
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(10)))
    cfg = cfg_for(tmp_path, src, tokenizer=tok_path)
    monkeypatch.setattr(Tokenizer, "size", property(lambda self: 70_000))
    prep = prepare(cfg, progress=False)
    assert prep.cache.meta["dtype"] == "uint32" and prep.cache.split("train").tokens.dtype == np.uint32
    monkeypatch.undo()
    assert_round_trip(prep, read_documents(cfg), cfg)
