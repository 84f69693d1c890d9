"""The labeled examples a probe fine-tunes on (pretrain/probe.py): the built-in task, or a user's labeled file, and
their train/test split by group.

Built-in task `stdlib-packages`: classify a docstring of the built-in corpus (pretrain/corpus.py, the same
documents, read with `ast`) by the top-level standard-library package its module belongs to (`email`,
`asyncio`, `xml`, ...): the `probe.classes` packages with the most docstrings among those with at least
MIN_MODULES modules holding some (a package of fewer could not put a module on each side). A group is a module
(its path under the standard library), so no module is in both train and test: a class's docstrings often
share wording within a module, and a split by docstring would let the probe recognise the module rather than
the package. The task depends on the Python version, as the corpus does; its results record it.

A user's file (`--data FILE.jsonl|.parquet`): one example per row, the text in `probe.text_field`, the label in
`probe.label_field` (strings or integers), the group in `probe.group_field` when given (rows that share a value
stay on one side), else the text itself (duplicates never straddle the split). JSON lines are parsed with
`json`, Parquet columns read with pyarrow: nothing is unpickled.

Split (`split`): per class, in the class's groups' seeded random order (blake2b of `probe.split_seed` and the
group), groups go to test until it holds `probe.test_fraction` of the class's examples, never its last group;
a group belongs to the class most of its rows have. Then at most `probe.max_per_class` training and a quarter
of that many test examples per class are kept (a seeded sample, the same for every run and seed), so big
classes do not swamp the rest and the probe's cost stays fixed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError

TASKS = {"stdlib-packages": "docstrings of the built-in corpus by top-level standard-library package, split by module"}
MIN_MODULES = 3  # a package needs this many modules with docstrings to be a class


@dataclass(frozen=True)
class Examples:
    """Labeled texts: texts[i] has label index labels[i] (into `classes`) and group groups[i]."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    groups: list[str]
    classes: list[str]

    def take(self, idx: np.ndarray) -> Examples:
        """The examples at `idx`, in that order."""
        return Examples([self.texts[i] for i in idx], self.labels[idx], [self.groups[i] for i in idx], self.classes)


@lru_cache(maxsize=2)  # `pretrain compare` probes every run in one process: read the standard library once
def stdlib_packages(n_classes: int) -> Examples:
    """The built-in task: docstrings labeled by top-level package, grouped by module (module docstring)."""
    from pretrain.corpus import file_documents, source_files, stdlib_dir

    root = stdlib_dir()
    by_package: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in source_files(root):
        rel = path.relative_to(root)
        if len(rel.parts) >= 2:  # a module inside a package (top-level modules belong to none)
            by_package[rel.parts[0]] += [(d, rel.as_posix()) for d in file_documents(path)]
    eligible = [p for p, docs in by_package.items() if len({g for _, g in docs}) >= MIN_MODULES]
    classes = sorted(sorted(eligible, key=lambda p: (-len(by_package[p]), p))[:n_classes])
    if len(classes) < 2:
        raise UserError(f"this Python's standard library has {len(classes)} package(s) with {MIN_MODULES} or more "
                        "documented modules; the built-in probe task needs two: give a labeled file with --data")
    rows = [(d, c, g) for c in classes for d, g in by_package[c]]
    return Examples([r[0] for r in rows], np.array([classes.index(r[1]) for r in rows], np.int64),
                    [r[2] for r in rows], classes)


def read_labeled(path: Path, text_field: str, label_field: str, group_field: str = "") -> Examples:
    """A user's labeled .jsonl or .parquet file (module docstring); UserError naming the file, row and field of
    any problem, and for a file with no rows or a single class."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} is not a file; give a labeled .jsonl or .parquet file")
    fields = [f for f in (text_field, label_field, group_field) if f]
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path, fields)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path, fields)
    else:
        raise UserError(f"--data {path}: a probe reads labeled .jsonl or .parquet files, not {path.suffix or 'this'}")
    texts, labels = [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]
    if not rows:
        raise UserError(f"{path} holds no labeled rows; write one object per line with '{text_field}' and "
                        f"'{label_field}'")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"{path} has one class ({classes[0]!r}) in '{label_field}'; a probe needs two or more "
                        "(or set probe.label_field to the field holding the labels)")
    groups = [str(r[group_field]) for r in rows] if group_field else texts
    return Examples(texts, np.array([classes.index(x) for x in labels], np.int64), groups, classes)


def _check_row(row: Any, fields: list[str], where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where} is not an object; a labeled file holds one object per line")
    for f in fields:
        if row.get(f) is None:
            have = ", ".join(sorted(row)) or "none"
            raise UserError(f"{where} has no '{f}' (its fields: {have}); set probe.text_field / probe.label_field / "
                            "probe.group_field to the right names")
    return row


def _jsonl_rows(path: Path, fields: list[str]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {i} is not JSON ({e}); write one JSON object per line") from None
            rows.append(_check_row(row, fields, f"{path} line {i}"))
    return rows


def _parquet_rows(path: Path, fields: list[str]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [f for f in fields if f not in names]
        if missing:
            raise UserError(f"{path} has no column '{missing[0]}' (its columns: {', '.join(names)}); set "
                            "probe.text_field / probe.label_field / probe.group_field to the right names")
        table = pq.read_table(path, columns=fields)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e})") from None
    return [_check_row(r, fields, f"{path} row {i}") for i, r in enumerate(table.to_pylist())]


def _rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def split(ex: Examples, test_fraction: float, seed: int, max_per_class: int) -> tuple[Examples, Examples]:
    """(train, test) by group, per class, then capped per class (module docstring)."""
    group_rows: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(ex.groups):
        group_rows[g].append(i)
    owner = {g: Counter(ex.labels[rows].tolist()).most_common(1)[0][0] for g, rows in group_rows.items()}
    test_groups: set[str] = set()
    for c in range(len(ex.classes)):
        mine = sorted((g for g in group_rows if owner[g] == c), key=lambda g: _rank(seed, g))
        total, held = sum(len(group_rows[g]) for g in mine), 0
        for g in mine[:-1]:  # the last group stays in train: every class trains
            if held >= test_fraction * total:
                break
            test_groups.add(g)
            held += len(group_rows[g])
    in_test = np.array([g in test_groups for g in ex.groups])
    parts = []
    for mask, cap in ((~in_test, max_per_class), (in_test, max(1, max_per_class // 4))):
        idx = np.flatnonzero(mask)
        keep = [i for c in range(len(ex.classes))
                for i in sorted(idx[ex.labels[idx] == c], key=lambda i: _rank(seed, f"{i}:{ex.texts[i]}"))[:cap]]
        parts.append(ex.take(np.array(sorted(keep), np.int64)))
    train, test = parts
    if not len(test.texts):
        raise UserError("the split left no test examples (every class has a single group); give more groups, or "
                        "rows without probe.group_field")
    return train, test
