"""The built-in default corpus: the docstrings of the running Python's standard library.

Every Python install carries a few MB of real English prose in its standard library. We read the
source files with `ast` (nothing is imported or executed), take each module, class and function
docstring, dedent it as `inspect.cleandoc` does, drop doctest examples (`>>>`/`...` lines and the
output lines after them), and keep each docstring of at least `MIN_CHARS` characters as one document.
Blank lines inside a docstring stay, so the sentence splitter sees its paragraphs.

The order is deterministic (sorted paths, then source order inside a file), so one Python version gives
one corpus; the data path streams it file by file (`source_files`, `file_documents`). `corpus_info` hashes
the text for the run's metadata; `corpus_fingerprint` is the cheap key (Python version, stdlib path, file
names/sizes/mtimes, extraction version) that lets a prepared cache be reused without reading the corpus.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import platform
import re
import sysconfig
from pathlib import Path

CORPUS_NAME = "python-stdlib-docstrings"
CORPUS_VERSION = 1  # bump when the extraction rules change: invalidates caches keyed on the fingerprint
MIN_CHARS = 40  # shorter docstrings ("Return x.") are mostly noise
# Folders that hold tests, demos, vendored or generated code rather than documented library code.
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo",
    "lib2to3", "ensurepip", "pydoc_data", "Tools", "venv",
})
_DEF = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLANKS = re.compile(r"\n\s*\n\s*(?:\n\s*)*")  # two or more line breaks with only spaces between


def stdlib_dir() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """Library .py files under root (default: the stdlib), sorted, without test/demo/vendored folders or
    test_*.py files."""
    root = stdlib_dir() if root is None else root
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith(("config-", "plat-")))
        files += [Path(d, n) for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files)


def drop_doctests(text: str) -> str:
    """Remove doctest examples: `>>>` lines, their `...` continuations and the expected-output lines
    that follow up to the next blank line (the doctest rule for where output ends)."""
    out, in_example = [], False
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith(">>>"):
            in_example = True
        elif in_example and not s:
            in_example = False
        if not in_example:
            out.append(line)
    return _BLANKS.sub("\n\n", "\n".join(out)).strip()


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings of one parsed file, in source order.

    Walks statement lists only (bodies of defs, classes, if/for/while/with/try), not expressions: a
    docstring can only be the first statement of a body, and skipping expressions makes this ~10x
    faster than `ast.walk`."""
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEF) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                found.append((first.lineno, first.value.value))
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                stack += [c for c in children if isinstance(c, ast.AST)]
    return [s for _, s in sorted(found, key=lambda x: x[0])]


def file_documents(path: Path) -> list[str]:
    """The documents of one source file: its docstrings of at least MIN_CHARS characters, dedented
    (`inspect.cleandoc`), doctest examples dropped, trailing spaces removed and runs of blank lines
    collapsed to one blank line. An unparsable or unreadable file gives none."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # a file for another Python version, or unreadable
        return []
    docs = []
    for raw in _docstrings(tree):
        text = inspect.cleandoc(raw)
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = drop_doctests(text)
        if len(text) >= MIN_CHARS:
            docs.append(text)
    return docs


def stdlib_documents() -> list[str]:
    """The built-in corpus: one document per standard-library docstring (see `file_documents`), in
    `source_files` order. Reads ~600 files in about a second; caches nothing."""
    return [d for path in source_files() for d in file_documents(path)]


def corpus_fingerprint() -> str:
    """Cheap sha256 key of the built-in corpus's inputs: extraction version, Python version, stdlib path,
    and every source file's relative name, size and mtime (a stat per file, no reading).

    Equal fingerprints mean `stdlib_documents()` would return the same text.
    """
    root = stdlib_dir()
    h = hashlib.sha256(f"{CORPUS_NAME} v{CORPUS_VERSION} {platform.python_version()} {root}\n".encode())
    for path in source_files(root):
        st = path.stat()
        h.update(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def corpus_info(documents: list[str] | None = None) -> dict:
    """Metadata of the built-in corpus: name, Python version, sha256 of the text, documents, bytes.

    Pass the documents if you already have them (prepare does), so the corpus is read at most once;
    without them this reads the corpus (about a second). The hash covers the documents joined by NUL.
    """
    docs = stdlib_documents() if documents is None else documents
    h = hashlib.sha256()
    n_bytes = 0
    for d in docs:
        b = d.encode("utf-8")
        n_bytes += len(b)
        h.update(b + b"\0")
    return {"name": CORPUS_NAME, "python_version": platform.python_version(), "sha256": h.hexdigest(),
            "documents": len(docs), "bytes": n_bytes}
