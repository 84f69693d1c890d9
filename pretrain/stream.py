"""Reading `data.source` as a stream of bounded chunks that can restart at any chunk.

`data.source` is one of:
  ""            the built-in corpus (pretrain/corpus.py: the standard library's docstrings), file by file;
  a file        .txt (a document per blank-line-separated block, or per line with data.doc_per="line"),
                .jsonl (the `data.text_field` string of each object), .json (a list of objects, an object
                holding one such list, or JSON lines; one larger than JSON_WHOLE_BYTES must be JSON lines),
                .parquet (the `data.text_field` column, by record batch); any other suffix is read as .txt;
  a folder      every .txt/.jsonl/.json/.parquet file under it, sorted by path (hidden files skipped); a
                folder without such files goes to `datasets`, and a `save_to_disk` folder to `load_from_disk`;
  a glob        ("data/*.jsonl", "corpus/**/*.txt") the matching files of those types, sorted;
  otherwise     a dataset name, streamed: `datasets.load_dataset_builder(name, data.dataset_config)
                .as_streaming_dataset(data.dataset_split)`, what `load_dataset(..., streaming=True)` does.
Local files are read with plain Python (and pyarrow for Parquet), so errors name the file and line and no
Arrow copy of the text lands in the Hugging Face cache.

A `Chunk` is about CHUNK_BYTES of input cut at a document boundary: a text file is read CHUNK_BYTES at a time
and cut inside its last blank line (or after its last line break), the rest carried into the next chunk, as
Hugging Face `datasets` reads text in `src/datasets/packaged_modules/text/text.py` (`Text._generate_tables`);
Parquet files and datasets are cut after the row where the text reaches CHUNK_BYTES characters. Every chunk
carries `start`, a JSON position (file, byte offset or row, line) from which the reader gives exactly the same
chunks again: chunking depends only on where it starts, so an interrupted prepare restarts at a chunk without
reading what came before. A part I of N (`--part I/N`) is a contiguous range of the files (balanced by bytes)
or of the dataset's shards, so the parts in order are the whole stream.

The fingerprint (part of every cache key) is cheap: each file's relative name, size and mtime, plus the
sha256 of file contents up to a budget of HASH_BUDGET bytes (whole small files, head and tail of big ones),
so a 1 TB corpus is not read to find its cache; a dataset's fingerprint is its builder hash (which covers
its resolved data files) or a saved dataset's `_fingerprint`.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.errors import UserError
from pretrain.text import Piece, piece_documents

if TYPE_CHECKING:
    from pretrain.config import DataConfig

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
CHUNK_BYTES = 1 << 20  # input a worker gets at once: bounds memory, and what a resume re-reads at most
TAIL_BYTES = 1 << 16  # the cut of a text chunk is looked for in its last 64 KiB first
JSON_WHOLE_BYTES = 64 << 20  # a .json file up to this size is parsed whole; a larger one is read as JSON lines
HASH_BUDGET = 64 << 20  # content bytes hashed for a fingerprint (the rest is fingerprinted by size and mtime)
HASH_ENDS = 1 << 16  # a file too big for the budget has its first and last 64 KiB hashed
_BREAK = rb"(?:\r\n|\r(?!\n)|\n)"  # one line break of any convention (a CRLF is never two)
_BLANK = re.compile(_BREAK + rb"[ \t]*" + _BREAK)  # a blank line


@dataclass
class Chunk:
    """About CHUNK_BYTES of the stream: what a worker turns into documents."""

    index: int  # 0, 1, ... in stream order (seeds the tokenizer sample's keys)
    start: dict  # JSON position: the reader restarted here gives this chunk and the ones after it
    pieces: list[Piece]
    units: int  # progress made (input bytes; estimated for Parquet)
    last: list[bool]  # per piece: it ends its file (for the empty-file check)


class EmptyFiles:
    """The empty-file check: a file read from its start that gave no document is a UserError."""

    def __init__(self, text_field: str):
        self.text_field = text_field
        self.docs: dict[str, int] = {}  # documents so far of each file whose first piece was seen

    def update(self, chunk: Chunk, piece_docs: list[int]) -> None:
        """Count the documents each piece of `chunk` gave; raise at the end of a file that gave none."""
        for piece, n, last in zip(chunk.pieces, piece_docs, chunk.last, strict=True):
            if piece.first:
                self.docs[piece.where] = 0
            if piece.where in self.docs:
                self.docs[piece.where] += n
                if last and self.docs.pop(piece.where) == 0:
                    what = "" if piece.kind in ("block", "line") else f" in {self.text_field!r}"
                    raise UserError(f"{piece.where} is empty: it holds no text{what}; give a file with text in it")


def sha_json(obj: Any) -> str:
    """sha256 of a JSON-serializable value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def partition(sizes: list[int], n: int, what: str) -> list[tuple[int, int]]:
    """n contiguous ranges [lo, hi) of the units with about equal total size, none empty; UserError naming
    `what` (the units) when there are fewer units than parts."""
    if len(sizes) < n:
        raise UserError(f"--part I/{n} needs at least {n} {what}, but the input has {len(sizes)}; use N <= "
                        f"{len(sizes)}")
    before = np.cumsum([0, *sizes[:-1]], dtype=np.float64)  # (F,) bytes before each unit
    bounds = [0]
    for k in range(1, n):  # the first unit at or past k/n of the bytes, leaving every part one unit or more
        cut = int(np.searchsorted(before, k * float(sum(sizes)) / n, side="left"))
        bounds.append(min(max(cut, bounds[-1] + 1), len(sizes) - (n - k)))
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _chunks(items: Iterator[tuple[Piece, int, dict, bool]], start: dict) -> Iterator[Chunk]:
    """Group (piece, units, position after it, ends its file) items into chunks of >= CHUNK_BYTES."""
    index, begin, pieces, ends, units, size = start["chunk"], start, [], [], 0, 0
    for piece, n_units, after, last in items:
        pieces.append(piece)
        ends.append(last)
        units += n_units
        size += len(piece.data) if piece.kind != "values" else sum(len(v) for v in piece.data if v)
        if size >= CHUNK_BYTES:
            yield Chunk(index, begin, pieces, units, ends)
            index += 1
            begin = {**after, "chunk": index}
            pieces, ends, units, size = [], [], 0, 0
    if pieces:
        yield Chunk(index, begin, pieces, units, ends)


def _rows_cut(values: list, budget: int) -> int:
    """Rows of `values` that make a piece: up to and including the row where the text reaches `budget`."""
    lengths = np.fromiter((len(v) if isinstance(v, str) else 0 for v in values), np.int64, len(values))
    k = int(np.searchsorted(np.cumsum(lengths), budget, side="left")) + 1
    return min(k, len(values))


class Source:
    """A resolved `data.source`: what it is, its fingerprint, and its chunks (see the module docstring)."""

    kind = ""  # "builtin", "files" or "dataset"
    unit = "shards"  # what a part is made of, for messages

    def __init__(self, description: str, fingerprint: str, files: list[str] | None = None):
        self.description = description
        self.fingerprint = fingerprint
        self.files = files or []

    def sizes(self) -> list[int]:
        """The size of every partition unit (file or dataset shard), in stream order."""
        raise NotImplementedError

    def part_range(self, part: tuple[int, int]) -> tuple[int, int]:
        """The units [lo, hi) of part I of N."""
        index, count = part
        return partition(self.sizes(), count, self.unit)[index]

    def check_part(self, part: tuple[int, int]) -> None:
        """UserError when the input cannot be split into that many parts."""
        self.part_range(part)

    def total(self, part: tuple[int, int]) -> int | None:
        """Progress units the part's chunks add up to (None when unknown)."""
        lo, hi = self.part_range(part)
        return int(sum(self.sizes()[lo:hi]))

    def chunks(self, part: tuple[int, int] = (0, 1), start: dict | None = None) -> Iterator[Chunk]:
        """The chunks of part I of N from `start` (a Chunk.start of this part), or from the part's beginning."""
        raise NotImplementedError


class FileSource(Source):
    """Local .txt/.jsonl/.json/.parquet files, read piece by piece."""

    kind, unit = "files", "files"

    def __init__(self, files: list[Path], cfg: DataConfig, description: str):
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        digests, budget = [], HASH_BUDGET
        for p in files:
            st = _stat(p)
            head = min(st.st_size, budget)
            digests.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns, _content_hash(p, st.st_size, head)])
            budget -= head
        super().__init__(description, sha_json({"files": digests, "doc_per": cfg.doc_per,
                                                "text_field": cfg.text_field}), [str(p) for p in files])
        self.paths, self.cfg, self._sizes = files, cfg, [d[1] for d in digests]

    def sizes(self) -> list[int]:
        """Bytes of each file."""
        return self._sizes

    def chunks(self, part=(0, 1), start=None):
        """The part's files piece by piece; a position is (file, byte offset or Parquet row, line)."""
        lo, hi = self.part_range(part)
        start = start or {"chunk": 0, "file": lo, "offset": 0, "line": 1}
        return _chunks(self._items(start, hi), start)

    def _items(self, start: dict, hi: int):
        for i in range(start["file"], hi):
            offset, line = (start["offset"], start["line"]) if i == start["file"] else (0, 1)
            p = self.paths[i]
            if p.suffix.lower() == ".parquet":
                items = _parquet_pieces(p, offset, self.cfg.text_field)
            else:
                items = _text_pieces(p, _kind(p, self._sizes[i], self.cfg.doc_per), offset, line)
            try:
                for piece, units, after, last in items:
                    yield piece, units, {"file": i, **after}, last
            except OSError as e:
                raise UserError(f"could not read {p}: {e.strerror or e}; check the file") from None


def _stat(p: Path) -> os.stat_result:
    try:
        return p.stat()
    except OSError as e:
        raise UserError(f"could not read {p}: {e.strerror or e}; check the path given to --data") from None


def _content_hash(p: Path, size: int, budget: int) -> str:
    """sha256 of the whole file when it fits the budget, else of its first and last HASH_ENDS bytes."""
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            if size <= budget:
                return hashlib.file_digest(f, "sha256").hexdigest()
            if budget >= 2 * HASH_ENDS:
                h.update(f.read(HASH_ENDS))
                f.seek(size - HASH_ENDS)
                h.update(f.read(HASH_ENDS))
    except OSError as e:
        raise UserError(f"could not read {p}: {e.strerror or e}; check the file") from None
    return h.hexdigest()


def _kind(p: Path, size: int, doc_per: str) -> str:
    """The piece kind of a text file."""
    suffix = p.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json" and size > JSON_WHOLE_BYTES:
        return "jsonl"
    return "json" if suffix == ".json" else doc_per  # "block" or "line"


def _cut(buf: bytearray, kind: str) -> int:
    """Where a piece may end in `buf` (an index past a line break; inside a blank line for "block"), or -1.
    A cut never falls between the "\\r" and "\\n" of a CRLF: the byte after the cut has been seen."""
    if kind == "json":
        return -1  # a whole .json file is one piece
    if kind != "block":
        i = buf.rfind(b"\n")
        j = buf.rfind(b"\r", 0, len(buf) - 1) if kind == "line" else -1
        return max(i, j) + 1 if max(i, j) >= 0 else -1
    for lo in (max(0, len(buf) - TAIL_BYTES), 0):
        ends = [m.end() for m in _BLANK.finditer(buf, lo) if m.end() < len(buf)]
        if ends:
            return ends[-1]
        if lo == 0:
            break
    return -1


def _text_pieces(p: Path, kind: str, offset: int, line: int):
    """(piece, bytes, position after it, ends the file) of a text file from byte `offset` (line `line`).
    A piece starting at byte o is cut from the window file[o:o + CHUNK_BYTES] (longer only while it holds no
    cut), so it depends on o alone: reading restarted at any piece gives the same pieces."""
    with open(p, "rb") as f:
        f.seek(offset)
        buf, first, eof, window = bytearray(), offset == 0, False, CHUNK_BYTES
        while True:
            if not eof and len(buf) < window:
                want = window - len(buf)
                block = f.read(want)
                buf += block
                eof = len(block) < want
            cut = len(buf) if eof else _cut(buf, kind)
            if cut < 0:
                window += CHUNK_BYTES  # one document longer than the window: read on
                continue
            data, window = bytes(buf[:cut]), CHUNK_BYTES
            del buf[:cut]
            offset, lines = offset + cut, data.count(b"\n")
            done = eof and not buf
            if data or first or done:  # the end is always marked, and an empty file still gives a piece
                yield Piece(kind, str(p), data, line, first), cut, {"offset": offset, "line": line + lines}, done
            line, first = line + lines, False
            if done:
                return


def _parquet_pieces(p: Path, row: int, text_field: str):
    """(piece, estimated bytes, position after it, ends the file) of a Parquet file from row `row`, read
    by record batch (only the text column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        schema = pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{p} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in schema.names:
        raise UserError(f"{p} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "use --set data.text_field=NAME")
    n, size = pf.metadata.num_rows, p.stat().st_size
    group_rows = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64)
    g = int(np.searchsorted(np.cumsum(group_rows), row, side="right"))
    skip, pending, done = row - int(group_rows[:g].sum()), [], row
    batches = pf.iter_batches(batch_size=8192, columns=[text_field], row_groups=range(g, pf.num_row_groups))
    for batch in batches if g < pf.num_row_groups else ():
        values = batch.column(0).to_pylist()
        pending += values[skip:]
        skip = max(0, skip - len(values))
        while pending and (k := _rows_cut(pending, CHUNK_BYTES)) < len(pending):
            yield *_rows_piece(p, pending[:k], done, n, size), {"offset": done + k, "line": 1}, False
            done, pending = done + k, pending[k:]
    if pending or row == 0:
        yield *_rows_piece(p, pending, done, n, size), {"offset": n, "line": 1}, True


def _rows_piece(p: Path, values: list, done: int, n: int, size: int) -> tuple[Piece, int]:
    """A "values" piece of rows [done, done + len(values)) and its estimated share of the file's bytes."""
    units = size * (done + len(values)) // max(n, 1) - size * done // max(n, 1)
    return Piece("values", str(p), values, done, done == 0), units


def resolve_source(cfg: DataConfig) -> Source:
    """Turn `cfg.source` into a Source without reading the documents (files are stat'ed and partly hashed).

    UserError for a missing path or a glob/folder with nothing to read. A dataset is opened here (its
    builder or saved copy), because its fingerprint comes from it.
    """
    src = cfg.source.strip()
    if not src:
        from pretrain.sources import BuiltinSource

        return BuiltinSource()
    path = Path(src).expanduser()
    if any(ch in src for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True)
                       if Path(p).is_file() and p.lower().endswith(SUFFIXES))
        if not files:
            raise UserError(f"no {'/'.join(SUFFIXES)} files match {src!r}; check the pattern")
        return FileSource(files, cfg, f"{len(files)} files matching {src}")
    if path.is_dir():
        from pretrain.sources import DatasetSource, is_saved_dataset

        if not is_saved_dataset(path):
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if files:
                return FileSource(files, cfg, f"{len(files)} files under {src}")
        return DatasetSource(cfg, str(path))
    if path.is_file():
        return FileSource([path], cfg, src)
    if path.exists():
        raise UserError(f"{src} is neither a file nor a folder; give text files, a folder, a glob or a dataset name")
    if _is_path_like(src):
        raise UserError(f"no such file or folder: {src}; check the path given to --data")
    from pretrain.sources import DatasetSource

    return DatasetSource(cfg, src)


def _is_path_like(s: str) -> bool:
    """A source string that can only mean a local path (so a missing one is 'no such file', not a dataset)."""
    return s.startswith(("/", "./", "../", "~", ".\\")) or s.lower().endswith(SUFFIXES) or os.sep in s and \
        not re.fullmatch(r"[\w.-]+/[\w.-]+", s)


def read_documents(cfg: DataConfig, stats: dict | None = None) -> Iterator[str]:
    """The documents of `cfg.source` as a stream, in a deterministic order, read in this process (the
    tokenizing workers are `pretrain.workers`). `stats`, if given, receives "replaced_bytes" (invalid UTF-8
    bytes replaced by U+FFFD). Every problem is a one-line UserError."""
    stats = {} if stats is None else stats
    stats.setdefault("replaced_bytes", 0)
    empty = EmptyFiles(cfg.text_field)
    for chunk in resolve_source(cfg).chunks():
        out = [piece_documents(piece, cfg.text_field) for piece in chunk.pieces]
        empty.update(chunk, [len(docs) for docs, _ in out])
        for docs, replaced in out:
            stats["replaced_bytes"] += replaced
            yield from docs
