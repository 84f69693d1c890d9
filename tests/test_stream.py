"""The streaming reader: every format read in tiny chunks equals a whole-file read, a restart at any chunk
gives the same rest of the stream, errors name file and line across chunks, parts partition the input,
and datasets are streamed (never loaded whole), offline."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from corpora import cfg_for, make_docs  # noqa: E402

from pretrain import sources, stream  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.stream import partition, read_documents, resolve_source  # noqa: E402
from pretrain.text import Piece, piece_documents  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 97 bytes (the cut is looked for in the last 16), so every file spans many chunks."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 97)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 97)
    monkeypatch.setattr(stream, "TAIL_BYTES", 16)


def whole(path, kind, text_field="text"):
    """The documents of a file parsed in one piece (the reference)."""
    return piece_documents(Piece(kind, str(path), path.read_bytes()), text_field)[0]


def write_files(d):
    """One file of each streamed kind, with awkward boundaries: CRLF, runs of blank lines, spaces on blank
    lines, a BOM, a document longer than a chunk, and a Parquet file of many row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(40, seed=4)
    d.mkdir()
    block = "\ufeff" + "\r\n\r\n".join(x.replace("\n\n", "\n \n\n") for x in docs[:20]) + "\n\n\n" + "long " * 80
    (d / "block.txt").write_bytes(block.encode())
    (d / "lines.txt").write_bytes("\r\n".join(x.replace("\n\n", " ") for x in docs).encode() + b"\r")
    (d / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" + ("\n" if i % 7 == 0 else "")
                                          for i, t in enumerate(docs)))
    pq.write_table(pa.table({"text": docs + [None, "  "]}), d / "table.parquet", row_group_size=7)
    return docs


def test_every_format_streamed_in_tiny_chunks_equals_a_whole_read(tmp_path, tiny_chunks):
    docs = write_files(tmp_path / "in")
    d = tmp_path / "in"
    assert len(list(resolve_source(cfg_for(tmp_path, d / "block.txt")).chunks())) > 20
    assert list(read_documents(cfg_for(tmp_path, d / "block.txt"))) == whole(d / "block.txt", "block")
    assert whole(d / "block.txt", "block")[-1] == ("long " * 80).strip() and len(whole(d / "block.txt", "block")) > 20
    assert list(read_documents(cfg_for(tmp_path, d / "lines.txt", doc_per="line"))) == whole(d / "lines.txt", "line")
    assert list(read_documents(cfg_for(tmp_path, d / "rows.jsonl"))) == docs
    assert list(read_documents(cfg_for(tmp_path, d / "table.parquet"))) == docs
    folder = list(read_documents(cfg_for(tmp_path, d)))  # every file, sorted by name
    assert folder == whole(d / "block.txt", "block") + whole(d / "lines.txt", "block") + docs + docs


def test_a_big_json_file_is_streamed_as_json_lines(tmp_path, monkeypatch, tiny_chunks):
    docs = make_docs(20, seed=6)
    (tmp_path / "big.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "list.json").write_text(json.dumps([{"text": t} for t in docs]))
    monkeypatch.setattr(stream, "JSON_WHOLE_BYTES", 200)
    assert list(read_documents(cfg_for(tmp_path, tmp_path / "big.json"))) == docs  # JSON lines, in chunks
    with pytest.raises(UserError, match=r"list.json:line 1 is a JSON list"):  # one big value cannot stream
        list(read_documents(cfg_for(tmp_path, tmp_path / "list.json")))
    monkeypatch.setattr(stream, "JSON_WHOLE_BYTES", 1 << 20)
    assert list(read_documents(cfg_for(tmp_path, tmp_path / "list.json"))) == docs  # small: parsed whole


@pytest.mark.parametrize("name", ["block.txt", "rows.jsonl", "table.parquet", ""])
def test_a_restart_at_any_chunk_gives_the_same_rest_of_the_stream(tmp_path, tiny_chunks, name):
    write_files(tmp_path / "in")
    source = resolve_source(cfg_for(tmp_path, tmp_path / "in" / name))
    chunks = list(source.chunks())
    assert len(chunks) > 3 and [c.index for c in chunks] == list(range(len(chunks)))
    for k in (1, len(chunks) // 2, len(chunks) - 1):
        again = list(source.chunks(start=json.loads(json.dumps(chunks[k].start))))  # positions are JSON
        assert [(c.index, c.start, c.pieces) for c in again] == [(c.index, c.start, c.pieces) for c in chunks[k:]]


def test_builtin_corpus_streams_file_by_file_and_restarts(tmp_path):
    from pretrain import corpus

    source = resolve_source(cfg_for(tmp_path, ""))
    chunks = list(source.chunks())
    assert [d for c in chunks for p in c.pieces for d in p.data] == corpus.stdlib_documents()
    assert [c.pieces for c in source.chunks(start=chunks[1].start)] == [c.pieces for c in chunks[1:]]


def test_errors_name_the_file_and_line_across_chunks(tmp_path, tiny_chunks):
    lines = [json.dumps({"text": t}) for t in make_docs(60, seed=1)]
    lines[56] = '{"text": oops}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:57: line 57 is not JSON"):
        list(read_documents(cfg_for(tmp_path, tmp_path / "bad.jsonl")))
    (tmp_path / "nul.txt").write_bytes(b"fine text here.\n\n" * 20 + b"then a \0 byte")
    with pytest.raises(UserError, match="nul.txt is not a text file"):
        list(read_documents(cfg_for(tmp_path, tmp_path / "nul.txt")))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("Some text.\n\nMore text.")
    (tmp_path / "d" / "b.txt").write_text(" \n\n \n")
    with pytest.raises(UserError, match=r"b.txt is empty: it holds no text"):
        list(read_documents(cfg_for(tmp_path, tmp_path / "d")))


def test_partition_is_contiguous_balanced_and_never_empty():
    sizes = [5, 1, 1, 1, 9, 2, 2, 3, 4, 4]
    for n in range(1, len(sizes) + 1):
        parts = partition(sizes, n, "files")
        assert parts[0][0] == 0 and parts[-1][1] == len(sizes) and len(parts) == n
        assert all(lo < hi for lo, hi in parts)
        assert all(a[1] == b[0] for a, b in zip(parts[:-1], parts[1:], strict=True))
    assert partition(sizes, 2, "files") == [(0, 5), (5, 10)]  # 17 and 15 bytes of 32
    with pytest.raises(UserError, match=r"--part I/11 needs at least 11 files, but the input has 10"):
        partition(sizes, 11, "files")


def test_fingerprint_is_cheap_but_sees_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "HASH_BUDGET", 1000)  # the big file gets only its ends hashed
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("x " * 5000 + "end.")
    small.write_text("Small file.")
    fp = resolve_source(cfg_for(tmp_path, tmp_path)).fingerprint
    assert resolve_source(cfg_for(tmp_path, tmp_path)).fingerprint == fp
    big.write_text("x " * 5000 + "END.")  # same size, new tail
    fp2 = resolve_source(cfg_for(tmp_path, tmp_path)).fingerprint
    assert fp2 != fp
    os.utime(big, ns=(1, 1))  # same bytes, another mtime: read again (a copy without -p is a new corpus)
    assert resolve_source(cfg_for(tmp_path, tmp_path)).fingerprint != fp2


def test_datasets_are_streamed_never_loaded_whole(tmp_path, monkeypatch, tiny_chunks):
    """A folder `datasets` understands (CSV files here: hub-style data files) is read with streaming, part by
    part over its files; a save_to_disk folder by batches of rows, restartable by row. Offline."""
    import csv

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded whole, not streamed"))
    monkeypatch.setattr(sources, "DATASET_BATCH", 5)
    docs = make_docs(30, seed=9)
    (tmp_path / "csvs").mkdir()
    for k in range(3):
        with open(tmp_path / "csvs" / f"part{k}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["text", "label"]] + [[t, 1] for t in docs[10 * k:10 * k + 10]])
    src = resolve_source(cfg_for(tmp_path, tmp_path / "csvs"))
    assert src.kind == "dataset" and src.sizes() == [1, 1, 1]
    assert [d for c in src.chunks() for p in c.pieces for d in p.data] == docs
    parts = [[d for c in src.chunks((i, 3)) for p in c.pieces for d in p.data] for i in range(3)]
    assert parts == [docs[:10], docs[10:20], docs[20:]]
    with pytest.raises(UserError, match="needs at least 4 shards, but the input has 3"):
        src.check_part((0, 4))

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "saved")
    saved = resolve_source(cfg_for(tmp_path, tmp_path / "saved"))
    chunks = list(saved.chunks())
    assert len(chunks) > 3 and [d for c in chunks for p in c.pieces for d in p.data] == docs
    assert [c.pieces for c in saved.chunks(start=chunks[2].start)] == [c.pieces for c in chunks[2:]]
    assert [d for c in saved.chunks((1, 2)) for p in c.pieces for d in p.data] == docs[15:]
