"""Turning raw text into documents, and documents into sentences (both run in the tokenizing workers).

The reader (pretrain/stream.py) cuts every input into `Piece`s of at most a few MB and never reads a whole
file; this module turns a piece into documents:
  "block"   .txt bytes: a document per blank-line-separated block, line breaks normalized to "\n" and each
            document stripped of surrounding whitespace (the reader only cuts inside a blank line);
  "line"    .txt bytes with data.doc_per="line": a document per line (cut after a line break);
  "jsonl"   JSON-lines bytes: the `data.text_field` string of each object, errors naming file and line;
  "json"    a whole small .json file: a list of objects, an object holding one such list, or JSON lines;
  "values"  strings already parsed (Parquet record batches, `datasets` rows, the built-in corpus).
Invalid UTF-8 bytes are replaced by U+FFFD and counted (`replaced`); a piece with NUL bytes or more than
10% invalid UTF-8 is not text (UserError). Whitespace-only documents are dropped. Reading a text file
piece by piece with the block rule applied per piece is what Hugging Face `datasets` does in
`src/datasets/packaged_modules/text/text.py` (`Text._generate_tables`, `sample_by="paragraph"`).
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from pretrain.errors import UserError

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
# Pieces -> documents


class Piece(NamedTuple):
    """A bounded slice of one input that a worker turns into documents (see the module docstring)."""

    kind: str  # "block", "line", "jsonl", "json" (data: bytes) or "values" (data: list of strings or None)
    where: str  # the file or dataset, for error messages
    data: bytes | list
    line: int = 1  # line number (or row number for "values") of the first line of `data`
    first: bool = True  # `data` starts its file (a UTF-8 byte-order mark may lead)


def piece_documents(piece: Piece, text_field: str) -> tuple[list[str], int]:
    """The documents of one piece, and the number of invalid UTF-8 bytes replaced in it."""
    if piece.kind == "values":
        return clean_texts(piece.data, piece.where, piece.line)
    text, replaced = decode(piece.data, piece.where, piece.first)
    if piece.kind in ("jsonl", "json"):
        docs, fixed = json_documents(text, piece.where, piece.line, text_field, lines=piece.kind == "jsonl")
        return docs, replaced + fixed
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = text.split("\n") if piece.kind == "line" else re.split(r"\n[ \t]*\n", text)
    return [d.strip() for d in parts if d.strip()], replaced


def decode(data: bytes, where: str, first: bool) -> tuple[str, int]:
    """UTF-8 text of raw bytes (a leading BOM dropped at a file's start) and the count of invalid bytes
    replaced by U+FFFD. UserError for bytes that are not text (NUL bytes, or more than 10% invalid UTF-8)."""
    if b"\0" in data:
        raise UserError(f"{where} is not a text file (it holds binary NUL bytes); give UTF-8 text")
    codec = "utf-8-sig" if first else "utf-8"
    try:
        return data.decode(codec), 0
    except UnicodeDecodeError:
        bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
        if bad > 0.1 * len(data):
            raise UserError(f"{where} is not a text file ({bad} of {len(data)} bytes are not UTF-8); "
                            "give UTF-8 text") from None
        return data.decode(codec, "replace"), bad


def clean_texts(values: list, where: str, row0: int = 0) -> tuple[list[str], int]:
    """Keep the non-blank strings; lone surrogates (possible from JSON escapes) are replaced and counted."""
    out, replaced = [], 0
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, str):
            raise UserError(f"{where}: item {row0 + i} has a {type(v).__name__} in the text field, not a string")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            fixed = v.encode("utf-8", "replace").decode("utf-8")
            replaced += sum(ch == "?" for ch in fixed) - v.count("?")
            v = fixed
        if v.strip():
            out.append(v)
    return out, replaced


def json_documents(text: str, where: str, line0: int, text_field: str, lines: bool) -> tuple[list[str], int]:
    """The text field of JSON objects, and the count of lone surrogates replaced. lines: one object per line
    (numbered from line0). Otherwise a whole .json file: a list of objects, an object holding one list of
    objects, or JSON lines."""
    if not lines:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise UserError(f"{where}:{e.lineno} is not JSON ({e.msg}); fix the file") from None
        else:
            if isinstance(obj, dict) and text_field not in obj:
                lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
                obj = lists[0] if len(lists) == 1 else obj
            rows = obj if isinstance(obj, list) else [obj]
            return _rows_text(enumerate(rows), where, text_field, "item")
    rows = []
    for lineno, line in enumerate(text.split("\n"), line0):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:{lineno}: line {lineno} is not JSON ({e.msg}); each line must be one "
                            "JSON object") from None
    return _rows_text(rows, where, text_field, "line")


def _rows_text(rows, where: str, text_field: str, unit: str) -> tuple[list[str], int]:
    """The text field of each JSON object, with errors naming the file and line/item."""
    values = []
    for i, row in rows:
        at = f"{where}:{unit} {i}"
        if not isinstance(row, dict):
            raise UserError(f"{at} is a JSON {type(row).__name__}, not an object with a {text_field!r} field")
        if text_field not in row:
            raise UserError(f"{at} has no field {text_field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                            "use --set data.text_field=NAME")
        v = row[text_field]
        if v is not None and not isinstance(v, str):
            raise UserError(f"{at} field {text_field!r} is a {type(v).__name__}, not a string")
        values.append(v)
    return clean_texts(values, where)  # json.loads never yields invalid UTF-8, only lone surrogates
