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
from corpora import assert_round_trip, cfg_for, decoded_docs, make_docs, split_arrays  # noqa: E402

from pretrain import shards  # noqa: E402
from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import TokenCache, TokenSplit, held_out, prepare, read_documents, split_sentences  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.tokenizer import N_SPECIAL, Tokenizer, train_tokenizer  # noqa: E402


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


def test_held_out_is_a_seeded_hash_of_each_document_and_keeps_both_splits():
    docs = make_docs(400, seed=2)
    a = held_out(docs, 0.1, 7)
    assert 20 <= a.sum() <= 60  # Binomial(400, 0.1): mean 40, sd 6
    assert (a == held_out(docs, 0.1, 7)).all() and (a != held_out(docs, 0.1, 8)).any()
    assert (held_out(docs[::-1], 0.1, 7) == a[::-1]).all()  # per document: order and neighbours do not matter
    assert held_out(["same text", "other", "same text"], 0.3, 1)[[0, 2]].tolist() in ([True, True], [False, False])
    # Two documents always give one of each, whichever way the hashes fall (none held out, or both).
    assert all(held_out(["a b", "c d"], f, seed).sum() == 1 for f in (0.001, 0.49) for seed in range(40))


# ------------------------------------------------------------------------------------ round trip and cache


def test_round_trip_multilingual_and_literal_specials(tmp_path):
    docs = make_docs()
    docs[0] = "Literal [MASK] and <pad> and <s> stay text. Ünïcödé 東京 😀!\n\n  Indented\tparagraph.\n"
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = cfg_for(tmp_path, tmp_path / "c.jsonl", vocab_size=500, valid_fraction=0.1)
    prep = prepare(cfg, progress=False)
    assert list(read_documents(cfg)) == docs
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
    assert st["train"]["documents"] + st["valid"]["documents"] == len(docs)
    assert st["valid"]["documents"] == held_out(docs, 0.1, cfg.split_seed).sum() > 0
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
    assert list(read_documents(cfg)) == want
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
    assert list(read_documents(cfg)) == docs
    assert_round_trip(prepare(cfg, progress=False), docs, cfg)

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:5]}),
                          "test": datasets.Dataset.from_dict({"text": docs[5:]})}).save_to_disk(tmp_path / "saved")
    assert list(read_documents(cfg_for(tmp_path, tmp_path / "saved", dataset_split="test"))) == docs[5:]
    with pytest.raises(UserError, match="has no column 'body'.*columns: text"):
        list(read_documents(cfg_for(tmp_path, tmp_path / "saved", text_field="body")))
    with pytest.raises(UserError, match="could not load dataset 'no-such-user/no-such-dataset'"):
        list(read_documents(cfg_for(tmp_path, "no-such-user/no-such-dataset")))


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
    docs = list(read_documents(cfg, stats))
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


def test_interrupted_build_leaves_nothing_trusted_and_resumes(tmp_path, tok_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(60)))
    cfg = cfg_for(tmp_path, src, tokenizer=tok_path, shard_tokens=300)
    clean = prepare(cfg_for(tmp_path, src, tokenizer=tok_path, cache_dir=str(tmp_path / "clean")), progress=False)
    close, calls = shards.ShardWriter.close, []

    def ctrl_c_at_third_shard(self, after):  # Ctrl-C while the third shard is being closed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        close(self, after)

    monkeypatch.setattr(shards.ShardWriter, "close", ctrl_c_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.undo()
    (key,) = [p for p in (tmp_path / "cache").iterdir() if p.name != "tokenizers"]
    part = key / "part-00000-of-00001"
    assert not (key / "manifest.json").exists() and not (part / "lock.json").exists()
    assert sorted(p.name for p in part.iterdir()) == ["progress.json", "shard-000000", "shard-000001"]
    with pytest.raises(UserError, match="not complete.*run the same `pretrain prepare` again"):
        TokenCache.open(key)
    # What a kill between the rename and progress.json leaves (a shard no progress lists) is never trusted.
    (part / "shard-000002").mkdir()
    (part / ".tmp-shard-000003").mkdir()
    again = prepare(cfg, progress=False)
    assert again.stats["shards_resumed"] == 2 and again.stats["shards_built"] == again.stats["shards"] - 2
    got, want = split_arrays(again.cache), split_arrays(clean.cache)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert not (part / ".tmp-shard-000003").exists()


def test_open_rejects_corrupt_cache(tmp_path, tok_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(10)))
    prep = prepare(cfg_for(tmp_path, src, tokenizer=tok_path), progress=False)
    path = prep.cache.path
    with open(path / "part-00000-of-00001" / "shard-000000" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="corrupt.*train.bin has 10 bytes"):
        TokenCache.open(path)
    with pytest.raises(UserError, match="unreadable"):
        (path / "manifest.json").write_text("{")
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
    # Round trip: the decoded splits are the corpus's documents, split by the hash rule, in corpus order.
    docs = corpus.stdlib_documents()
    valid = held_out(docs, cfg.valid_fraction, cfg.split_seed)
    got = decoded_docs(prep)
    assert got["train"] == [d for d, v in zip(docs, valid, strict=True) if not v]
    assert got["valid"] == [d for d, v in zip(docs, valid, strict=True) if v]
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
    assert_round_trip(prep, list(read_documents(cfg)), cfg)
