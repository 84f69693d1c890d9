"""Reading raw text into documents, and splitting documents into sentences.

`data.source` is one of:
  ""            the built-in corpus (pretrain/corpus.py: the standard library's docstrings);
  a file        .txt: a document per blank-line-separated block (or per line with data.doc_per="line"),
                line breaks normalized to "\n" and each document stripped of surrounding whitespace;
                .jsonl / .json: the `data.text_field` string of each object (.json: a list of objects, an
                object holding one such list, or JSON lines); .parquet: the `data.text_field` column;
                any other suffix is read as .txt;
  a folder      every .txt/.jsonl/.json/.parquet file under it, sorted by path (hidden files skipped); a
                folder without such files (CSV files, a dataset script, ...) goes to
                `datasets.load_dataset`, and a `save_to_disk` folder to `datasets.load_from_disk`;
  a glob        ("data/*.jsonl", "corpus/**/*.txt") the matching files of those types, sorted;
  otherwise     a dataset name: `datasets.load_dataset(name, data.dataset_config, split=data.dataset_split)`.
Local files are read with plain Python (and pyarrow for Parquet, as `datasets` does) rather than through
`datasets`: the errors can name the file and line, invalid UTF-8 bytes can be counted, and no second
Arrow copy of the text lands in the Hugging Face cache. Invalid UTF-8 bytes are replaced by U+FFFD and
counted (`replaced_bytes`); a file with NUL bytes or mostly invalid UTF-8 is not text (UserError).
Whitespace-only documents are dropped. Every problem is a one-line UserError raised before anything is
written.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import DataConfig

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


# ----------------------------------------------------------------------------------------------------------
# Sentences

# Words that end with "." without ending a sentence (compared lower-cased, without the final ".").
ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf viz al approx resp mr mrs ms dr prof sr jr st no nos fig figs eq eqs sec ch vol pp "
    "ed eds inc ltd co corp dept jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_PARAGRAPH = re.compile(r"\s*\n[ \t]*\n\s*")  # a blank line and the whitespace around it
_END = re.compile(r"(?:[.!?]+[\"'”’»)\]]*(?=\s+[\"'“‘«(\[]*(\w))|[。！？]+[」』）”’]*(?=\s*\S))")


def split_sentences(doc: str) -> list[str]:
    """Split a document into sentences that concatenate back to it exactly (`"".join(...) == doc`).

    The rule: a sentence ends (1) where a paragraph break (a blank line) begins, and (2) after `.`, `!` or
    `?` (and any closing quotes/brackets) that is followed by whitespace and then a digit or a letter that
    is not lowercase (uppercase, or from a caseless script such as CJK), optionally after opening
    quotes/brackets, unless the word before a `.` is a known abbreviation
    ("e.g.", "Mr.", "etc.", see ABBREVIATIONS) or a single letter (an initial, "J. Smith"); (3) after
    `。！？` followed by more text. The whitespace between two sentences starts the next one, so a
    mid-text word keeps its "▁" mark when each sentence is tokenized alone. Whitespace-only pieces are
    merged into the next sentence; an all-whitespace document gives [doc].
    """
    cuts = {m.start() for m in _PARAGRAPH.finditer(doc)}
    for m in _END.finditer(doc):
        nxt = m.group(1)
        if nxt is not None and (nxt.islower() or not (nxt.isalpha() or nxt.isdigit())):
            continue
        if doc[m.start()] == "." and not doc.startswith("..", m.start()):  # one period, not an ellipsis
            word = doc[:m.start()].rsplit(None, 1)[-1] if doc[:m.start()].strip() else ""
            word = word.lstrip("\"'“‘«([").lower()
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        cuts.add(m.end())
    out: list[str] = []
    start, carry = 0, ""
    for c in sorted(cuts):
        if 0 < c < len(doc) and c > start:
            piece = carry + doc[start:c]
            start = c
            if piece.strip():
                out.append(piece)
                carry = ""
            else:
                carry = piece  # whitespace only: starts the next sentence
    last = carry + doc[start:]
    if out and not last.strip():
        out[-1] += last
    else:
        out.append(last)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading text


@dataclass
class Source:
    """A resolved `data.source`: what it is, a cheap fingerprint of its content, and how to read it."""

    kind: str  # "builtin", "files" or "dataset"
    description: str  # one line for people ("3 files under corpus/", "built-in python-stdlib-docstrings ...")
    fingerprint: str  # sha256 that changes whenever the documents could change
    read: Callable[[dict], list[str]]  # reads the documents, adding counts (replaced_bytes) to the dict
    files: list[str] = field(default_factory=list)


def sha_json(obj: Any) -> str:
    """sha256 of a JSON-serializable value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _is_path_like(s: str) -> bool:
    """A source string that can only mean a local path (so a missing one is 'no such file', not a dataset)."""
    return s.startswith(("/", "./", "../", "~", ".\\")) or s.lower().endswith(SUFFIXES) or os.sep in s and \
        not re.fullmatch(r"[\w.-]+/[\w.-]+", s)


def resolve_source(cfg: DataConfig) -> Source:
    """Turn `cfg.source` into a Source without reading the documents (files are hashed, not parsed).

    UserError for a missing path or a glob/folder with nothing to read. A datasets name is loaded here
    (from the Hugging Face cache when present) because its fingerprint comes from the loaded dataset.
    """
    src = cfg.source.strip()
    if not src:
        from pretrain import corpus

        return Source("builtin", f"built-in {corpus.CORPUS_NAME} (Python {_pyver()})", corpus.corpus_fingerprint(),
                      lambda stats: corpus.stdlib_documents())
    path = Path(src).expanduser()
    if any(ch in src for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True)
                       if Path(p).is_file() and p.lower().endswith(SUFFIXES))
        if not files:
            raise UserError(f"no {'/'.join(SUFFIXES)} files match {src!r}; check the pattern")
        return _file_source(cfg, files, f"{len(files)} files matching {src}")
    if path.is_dir():
        if _is_saved_dataset(path):
            return _dataset_source(cfg, str(path))
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if files:
            return _file_source(cfg, files, f"{len(files)} files under {src}")
        return _dataset_source(cfg, str(path))
    if path.is_file():
        return _file_source(cfg, [path], src)
    if path.exists():
        raise UserError(f"{src} is neither a file nor a folder; give text files, a folder, a glob or a dataset name")
    if _is_path_like(src):
        raise UserError(f"no such file or folder: {src}; check the path given to --data")
    return _dataset_source(cfg, src)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its .json files are metadata)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _pyver() -> str:
    import platform

    return platform.python_version()


def _file_source(cfg: DataConfig, files: list[Path], description: str) -> Source:
    """A Source over local files, fingerprinted by their bytes and the options that change their reading."""
    digests = []
    for p in files:
        with open(p, "rb") as f:
            digests.append([p.name, hashlib.file_digest(f, "sha256").hexdigest()])
    fp = sha_json({"files": digests, "doc_per": cfg.doc_per, "text_field": cfg.text_field})

    def read(stats: dict) -> list[str]:
        docs: list[str] = []
        for p in files:
            docs += _read_file(p, cfg, stats)
        return docs

    return Source("files", description, fp, read, [str(p) for p in files])


def _dataset_source(cfg: DataConfig, name: str) -> Source:
    """A Source over `datasets.load_dataset(name, cfg.dataset_config, split=cfg.dataset_split)` (a hub
    name, or a local folder/script that `datasets` understands), or a folder written by `save_to_disk`."""
    import datasets

    try:
        if Path(name).is_dir() and _is_saved_dataset(Path(name)):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.dataset_split]
        else:
            ds = datasets.load_dataset(name, cfg.dataset_config or None, split=cfg.dataset_split)
    except Exception as e:  # the hub, a script or a loader: their errors vary; keep the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load dataset {name!r} (config {cfg.dataset_config or 'default'!r}, split "
                        f"{cfg.dataset_split!r}): {msg}; check the name, data.dataset_config and "
                        "data.dataset_split, or give a local path") from None
    if cfg.text_field not in ds.column_names:
        raise UserError(f"dataset {name!r} has no column {cfg.text_field!r} (columns: "
                        f"{', '.join(ds.column_names)}); use --set data.text_field=NAME")
    fp = sha_json({"dataset": name, "config": cfg.dataset_config, "split": cfg.dataset_split,
               "fingerprint": ds._fingerprint, "text_field": cfg.text_field})

    def read(stats: dict) -> list[str]:
        docs = []
        for batch in ds.select_columns([cfg.text_field]).iter(batch_size=10_000):
            docs += _clean_texts(batch[cfg.text_field], stats, f"dataset {name!r}")
        if not docs:
            raise UserError(f"dataset {name!r} split {cfg.dataset_split!r} has no text in {cfg.text_field!r}")
        return docs

    desc = f"dataset {name}" + (f" ({cfg.dataset_config})" if cfg.dataset_config else "") + f" [{cfg.dataset_split}]"
    return Source("dataset", desc, fp, read)


def _clean_texts(values: list, stats: dict, where: str) -> list[str]:
    """Keep non-blank strings; lone surrogates (possible from JSON escapes) are replaced and counted."""
    out = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, str):
            raise UserError(f"{where}: item {i} has a {type(v).__name__} in the text field, not a string")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            fixed = v.encode("utf-8", "replace").decode("utf-8")
            stats["replaced_bytes"] = stats.get("replaced_bytes", 0) + sum(ch == "?" for ch in fixed) - v.count("?")
            v = fixed
        if v.strip():
            out.append(v)
    return out


def _decode(path: Path, stats: dict) -> str:
    """The file's text: UTF-8 (a leading BOM dropped); invalid bytes replaced and counted. UserError for an
    empty file or one that is not text (NUL bytes, or more than 10% invalid UTF-8)."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path} is empty: it holds no text; give a file with text in it")
    if b"\0" in data:
        raise UserError(f"{path} is not a text file (it holds binary NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
        if bad > 0.1 * len(data):
            raise UserError(f"{path} is not a text file ({bad} of {len(data)} bytes are not UTF-8); "
                            "give UTF-8 text") from None
        stats["replaced_bytes"] = stats.get("replaced_bytes", 0) + bad
        return data.decode("utf-8-sig", "replace")


def _read_file(path: Path, cfg: DataConfig, stats: dict) -> list[str]:
    """Documents of one local file (see the module docstring for the formats)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        docs = _read_parquet(path, cfg.text_field, stats)
    elif suffix in (".jsonl", ".json"):
        docs = _read_json(path, _decode(path, stats), cfg.text_field, stats, lines=suffix == ".jsonl")
    else:
        text = _decode(path, stats).replace("\r\n", "\n").replace("\r", "\n")
        parts = text.split("\n") if cfg.doc_per == "line" else re.split(r"\n[ \t]*\n", text)
        docs = [d.strip() for d in parts if d.strip()]
    if not docs:
        raise UserError(f"{path} is empty: it holds no text in {cfg.text_field!r}" if suffix != ".txt" else
                        f"{path} is empty: it holds no text")
    return docs


def _rows_text(rows, path: Path, text_field: str, stats: dict, where: Callable[[int], str]) -> list[str]:
    """The text field of each JSON object, with errors naming the file and line/item."""
    values = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}:{where(i)} is a JSON {type(row).__name__}, not an object with a "
                            f"{text_field!r} field")
        if text_field not in row:
            raise UserError(f"{path}:{where(i)} has no field {text_field!r} (fields: "
                            f"{', '.join(map(str, row)) or 'none'}); use --set data.text_field=NAME")
        v = row[text_field]
        if v is not None and not isinstance(v, str):
            raise UserError(f"{path}:{where(i)} field {text_field!r} is a {type(v).__name__}, not a string")
        values.append(v)
    return _clean_texts(values, stats, str(path))


def _read_json(path: Path, text: str, text_field: str, stats: dict, lines: bool) -> list[str]:
    """.jsonl: one object per line. .json: a list of objects, an object holding one list of objects,
    or JSON lines."""
    if not lines:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise UserError(f"{path}:{e.lineno} is not JSON ({e.msg}); fix the file") from None
            lines = True  # several JSON values: JSON lines in a .json file
        else:
            if isinstance(obj, dict) and text_field not in obj:
                lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
                obj = lists[0] if len(lists) == 1 else obj
            rows = obj if isinstance(obj, list) else [obj]
            return _rows_text(enumerate(rows), path, text_field, stats, lambda i: f"item {i}")
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: line {lineno} is not JSON ({e.msg}); each line must be one "
                            "JSON object") from None
    return _rows_text(rows, path, text_field, stats, lambda i: f"line {i}")


def _read_parquet(path: Path, text_field: str, stats: dict) -> list[str]:
    """The `text_field` column of a Parquet file (read with pyarrow, as `datasets` does)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); "
                            "use --set data.text_field=NAME")
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return _clean_texts(column.to_pylist(), stats, str(path))


def read_documents(cfg: DataConfig, stats: dict | None = None) -> list[str]:
    """The documents of `cfg.source` (see the module docstring), in a deterministic order.

    `stats`, if given, receives "replaced_bytes" (invalid UTF-8 bytes replaced by U+FFFD). Every problem
    is a one-line UserError raised before anything is written.
    """
    stats = {} if stats is None else stats
    stats.setdefault("replaced_bytes", 0)
    return resolve_source(cfg).read(stats)
