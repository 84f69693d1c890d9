"""Raw text -> token cache on disk -> the token arrays objectives draw batches from.

A split of the cache is three arrays: every document's tokens back to back with no separator (objectives
add `</s>` or nothing, as their paper does), document offsets and sentence offsets (sentence boundaries
are found once, at prepare time).

Reading text and splitting sentences live in pretrain/text.py (re-exported here).

Cache (`prepare`). The folder `<cache_dir>/<key>/` holds, per split (train, valid): `<split>.bin` (flat
uint16 tokens; uint32 when the vocabulary has more than 65536 pieces), `<split>.docs.npy` and `<split>.sents.npy`
(int64 offsets), and `meta.json`. The key hashes everything the content depends on (tokenizer sha256,
source fingerprint, reading options, split options, FORMAT_VERSION), so a cache is reused exactly when its
inputs are unchanged. The source fingerprint is cheap: sha256 of the files' bytes, the built-in corpus's
file stats (corpus.corpus_fingerprint), or the dataset's `_fingerprint`. A trained tokenizer is kept in
`<cache_dir>/tokenizers/<key>.model`, keyed the same way. A cache is built in a temporary folder and
renamed into place in one `os.replace`, with meta.json written last: an interrupted prepare leaves no
folder that `TokenCache.open` accepts.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pretrain.errors import UserError
from pretrain.text import Source, read_documents, resolve_source, sha_json, split_sentences

__all__ = ["TokenSplit", "TokenCache", "Prepared", "prepare", "split_documents", "read_documents",
           "resolve_source", "split_sentences", "Source", "FORMAT_VERSION"]

if TYPE_CHECKING:
    from pretrain.config import DataConfig
    from pretrain.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the cache layout or the sentence rule changes: old caches are then rebuilt
SPLITS = ("train", "valid")
TOKENIZER_SEED = 1234  # sentencepiece's sampling seed when training a tokenizer for a corpus


@dataclass(frozen=True, eq=False)
class TokenSplit:
    """One split (train or valid) of the token cache.

    tokens:       (N,) uint16/uint32, memory-mapped: all documents back to back, no separators.
    doc_offsets:  (D+1,) int64: document d is tokens[doc_offsets[d]:doc_offsets[d+1]]; doc_offsets[0] = 0.
    sent_offsets: (S+1,) int64: sentence s is tokens[sent_offsets[s]:sent_offsets[s+1]]; every document
                  start is a sentence start, and sent_offsets[-1] = N.
    n_bytes:      UTF-8 bytes of the split's text (for bits per byte).
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    sent_offsets: np.ndarray
    n_bytes: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_sents(self) -> int:
        return len(self.sent_offsets) - 1

    @cached_property
    def sent_doc(self) -> np.ndarray:
        """(S,) int64: the document each sentence belongs to."""
        return np.searchsorted(self.doc_offsets, self.sent_offsets[:-1], side="right") - 1

    @cached_property
    def doc_first_sent(self) -> np.ndarray:
        """(D+1,) int64: sentences of document d are doc_first_sent[d]:doc_first_sent[d+1]."""
        return np.searchsorted(self.sent_offsets, self.doc_offsets, side="left")

    @classmethod
    def from_documents(cls, docs: list[list[list[int]]], n_bytes: int = 0) -> TokenSplit:
        """Build an in-memory split from documents given as lists of sentences of token ids (for tests)."""
        sents = [s for d in docs for s in d]
        assert all(len(s) > 0 for s in sents), "empty sentence"
        sent_lens = np.array([len(s) for s in sents], np.int64)
        doc_lens = np.array([sum(len(s) for s in d) for d in docs], np.int64)
        tokens = np.array([t for s in sents for t in s], np.uint32)
        sent_offsets = np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int64)
        doc_offsets = np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64)
        return cls(tokens=tokens, doc_offsets=doc_offsets, sent_offsets=sent_offsets, n_bytes=n_bytes)


# ----------------------------------------------------------------------------------------------------------
# The token cache


def split_documents(n_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """(D,) bool: True for the documents held out for validation.

    round(valid_fraction * D) documents drawn by a seeded permutation, clamped so both splits get at least
    one document; fewer than 2 documents is a UserError.
    """
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} document(s), but a train/validation split needs at least 2; "
                        "give more text (for a .txt file, separate documents by blank lines or use "
                        "--set data.doc_per=line)")
    n_valid = min(n_docs - 1, max(1, round(valid_fraction * n_docs)))
    is_valid = np.zeros(n_docs, bool)
    is_valid[np.random.default_rng(seed).permutation(n_docs)[:n_valid]] = True
    return is_valid


class TokenCache:
    """A prepared token cache folder: meta.json plus, per split, tokens and offsets (see the module
    docstring). Open one with `TokenCache.open(path)`; `split("train")` gives a memory-mapped TokenSplit."""

    def __init__(self, path: Path, meta: dict):
        """Use `TokenCache.open`, which validates the folder."""
        self.path = path
        self.meta = meta
        self._splits: dict[str, TokenSplit] = {}

    @classmethod
    def open(cls, path: Path | str) -> TokenCache:
        """Open and validate a cache folder: UserError if meta.json is missing or unreadable, was written by
        another format version, or any file is missing or has the wrong size."""
        path = Path(path)
        fix = "delete the folder and run `pretrain prepare` again"
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is not a complete token cache (no meta.json); {fix}") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}/meta.json is unreadable ({e}); {fix}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} was written by cache format {meta.get('format_version')}, this version reads "
                            f"{FORMAT_VERSION}; {fix}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name in SPLITS:
            m = meta["splits"][name]
            try:
                size = (path / f"{name}.bin").stat().st_size
                docs = np.load(path / f"{name}.docs.npy", mmap_mode="r")
                sents = np.load(path / f"{name}.sents.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"{path} is incomplete or corrupt ({name}: {e}); {fix}") from None
            if (size != m["tokens"] * itemsize or docs.shape != (m["documents"] + 1,)
                    or sents.shape != (m["sentences"] + 1,) or docs[-1] != m["tokens"] or sents[-1] != m["tokens"]):
                raise UserError(f"{path} is corrupt ({name} files do not match meta.json); {fix}")
        return cls(path, meta)

    def split(self, name: str) -> TokenSplit:
        """The "train" or "valid" split: tokens memory-mapped read-only, offsets loaded into memory."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._splits:
            tokens = np.memmap(self.path / f"{name}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
            self._splits[name] = TokenSplit(
                tokens=tokens,
                doc_offsets=np.load(self.path / f"{name}.docs.npy"),
                sent_offsets=np.load(self.path / f"{name}.sents.npy"),
                n_bytes=int(self.meta["splits"][name]["bytes"]),
            )
        return self._splits[name]

    def __repr__(self) -> str:
        return f"TokenCache({self.path})"


@dataclass
class Prepared:
    """What `prepare` returns: the tokenizer, the opened cache, and figures for the console."""

    tokenizer: Tokenizer
    cache: TokenCache
    stats: dict


def prepare(cfg: DataConfig, *, extra_pieces: tuple[str, ...] = (), progress: bool = True,
            console=None) -> Prepared:
    """Build (or reuse) the tokenizer and token cache for `cfg`; returns them with stats. A trained tokenizer
    gets `extra_pieces` (the objective's own special pieces) after the fixed ones; a given one must have them.

    Steps: resolve the source and fingerprint it (cheap); use `cfg.tokenizer` or the tokenizer trained for
    this corpus (trained now if absent: reads the documents); if the cache for (tokenizer, source,
    options) exists, open it and return (reused=True); otherwise read the documents (once), split them
    into sentences, split documents into train/valid, tokenize every sentence on all cores, and write the
    cache atomically. Every input error is a UserError raised before anything is written.

    stats: documents, sentences, tokens, bytes (totals), "train"/"valid" dicts of the same, replaced_bytes,
    reused, seconds (this call), read_seconds, tokenizer_seconds, tokenize_seconds and tokens_per_s (of
    the build; from meta.json when reused), source, path, tokenizer_path, dtype.
    """
    t0 = time.perf_counter()
    bars = _Bars(progress, console)
    try:
        return _prepare(cfg, tuple(extra_pieces), bars, t0)
    finally:
        bars.close()


def _prepare(cfg: DataConfig, extra_pieces: tuple[str, ...], bars: _Bars, t0: float) -> Prepared:
    """`prepare` with its progress bars."""
    from pretrain.tokenizer import Tokenizer, train_tokenizer

    source = resolve_source(cfg)
    root = Path(cfg.cache_dir).expanduser()
    read_stats = {"replaced_bytes": 0}
    timings = {"read_seconds": 0.0, "tokenizer_seconds": 0.0}
    loaded: dict[str, list] = {}

    def documents() -> tuple[list[str], list[list[str]]]:
        if not loaded:
            t = time.perf_counter()
            task = bars.task("reading", None)
            docs = source.read(read_stats)
            if not docs:
                raise UserError(f"{source.description} holds no text")
            split_documents(len(docs), cfg.valid_fraction, cfg.split_seed)  # fail before writing anything
            loaded["docs"], loaded["sents"] = docs, [split_sentences(d) for d in docs]
            bars.finish(task)
            timings["read_seconds"] = time.perf_counter() - t
        return loaded["docs"], loaded["sents"]

    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer, extra_pieces)
    else:
        extra = {"extra_pieces": list(extra_pieces)} if extra_pieces else {}  # none: the key stays as it was
        tkey = sha_json({"source": source.fingerprint, "vocab_size": cfg.vocab_size, "type": cfg.tokenizer_type,
                         "seed": TOKENIZER_SEED, "format": FORMAT_VERSION, "limit": cfg.vocab_limit, **extra})[:24]
        tpath = root / "tokenizers" / f"{tkey}.model"
        if not tpath.is_file():
            _, sents = documents()
            t = time.perf_counter()
            task = bars.task("tokenizer", None)
            train_tokenizer((s for doc in sents for s in doc), tpath.with_suffix(""), cfg.vocab_size,
                            cfg.tokenizer_type, seed=TOKENIZER_SEED, soft_limit=cfg.vocab_limit == "soft",
                            extra_pieces=extra_pieces)
            bars.finish(task)
            timings["tokenizer_seconds"] = time.perf_counter() - t
        tok = Tokenizer.load(tpath)

    key = sha_json({"tokenizer": tok.sha256, "source": source.fingerprint, "doc_per": cfg.doc_per,
                "text_field": cfg.text_field, "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed,
                "format": FORMAT_VERSION})[:24]
    path = root / key
    if path.is_dir():
        try:
            cache = TokenCache.open(path)
        except UserError:  # only a folder not made by prepare can be incomplete here: rebuild it
            shutil.rmtree(path, ignore_errors=True)
        else:
            return Prepared(tok, cache, _stats(cache, reused=True, seconds=time.perf_counter() - t0))
    docs, sents = documents()
    cache = _build(path, docs, sents, tok, cfg, source, read_stats, timings, bars)
    return Prepared(tok, cache, _stats(cache, reused=False, seconds=time.perf_counter() - t0))


class _Bars:
    """Rich progress bars, started on first use so that a reused cache prints nothing."""

    def __init__(self, enabled: bool, console):
        self.enabled, self.console, self.progress = enabled, console, None

    def task(self, description: str, total: int | None):
        """Add a bar (total None: an activity without a known size, shown pulsing)."""
        if self.progress is None:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description:<11}"), BarColumn(), TaskProgressColumn(),
                                     TimeElapsedColumn(), console=self.console, disable=not self.enabled)
            self.progress.start()
        return self.progress.add_task(description, total=total)

    def advance(self, task, n: int) -> None:
        self.progress.advance(task, n)

    def finish(self, task) -> None:
        self.progress.update(task, total=1, completed=1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _stats(cache: TokenCache, reused: bool, seconds: float) -> dict:
    """The figures `prepare` reports, from the cache's meta.json."""
    meta = cache.meta
    sp = meta["splits"]
    totals = {k: sum(sp[s][k] for s in SPLITS) for k in ("documents", "sentences", "tokens", "bytes")}
    return {**totals, **{s: dict(sp[s]) for s in SPLITS}, **meta["build"], "replaced_bytes": meta["replaced_bytes"],
            "reused": reused, "seconds": seconds, "source": meta["source"]["description"], "path": str(cache.path),
            "tokenizer_path": meta["tokenizer"]["path"], "vocab_size": meta["tokenizer"]["size"],
            "dtype": meta["dtype"]}


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary build folders left by prepares that were killed (their process is gone)."""
    for p in root.glob(".tmp-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[-1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass


def _build(path: Path, docs: list[str], sents: list[list[str]], tok: Tokenizer, cfg: DataConfig,
           source: Source, read_stats: dict, timings: dict, bars: _Bars) -> TokenCache:
    """Tokenize and write the cache into a temporary folder, then rename it to `path` (see module docstring)."""
    is_valid = split_documents(len(docs), cfg.valid_fraction, cfg.split_seed)
    dtype = np.dtype(np.uint16 if tok.size <= 1 << 16 else np.uint32)
    flat = [s for doc in sents for s in doc]  # every sentence in document order
    n_sents = np.array([len(doc) for doc in sents], np.int64)  # (D,)
    doc_bytes = np.array([len(d.encode("utf-8")) for d in docs], np.int64)  # (D,)
    threads = os.cpu_count() or 1
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path.parent)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # Tokenize sentence by sentence (so sentence offsets are exact), in chunks so the bar moves.
        task = bars.task("tokenizing", len(flat))
        t = time.perf_counter()
        lens, arrays, chunk = [], [], 1 << 15
        for i in range(0, len(flat), chunk):
            ids = tok.encode_batch(flat[i:i + chunk], num_threads=threads)
            n = np.fromiter(map(len, ids), np.int64, len(ids))
            lens.append(n)
            arrays.append(np.fromiter(itertools.chain.from_iterable(ids), dtype, int(n.sum())))
            bars.advance(task, len(ids))
        timings["tokenize_seconds"] = time.perf_counter() - t
        sent_lens = np.concatenate(lens)  # (S,)
        tokens = np.concatenate(arrays)  # (N,)
        assert (sent_lens > 0).all(), "a non-blank sentence gave no tokens"
        sent_doc = np.repeat(np.arange(len(docs)), n_sents)  # (S,)
        doc_lens = np.bincount(sent_doc, weights=sent_lens, minlength=len(docs)).astype(np.int64)  # (D,)
        task = bars.task("writing", len(tokens))
        tmp.mkdir()
        splits = {}
        for name, in_split in (("train", ~is_valid), ("valid", is_valid)):
            sent_mask = in_split[sent_doc]  # (S,)
            part = tokens[np.repeat(sent_mask, sent_lens)]  # (N_split,)
            with open(tmp / f"{name}.bin", "wb") as f:
                for j in range(0, len(part), 1 << 24):
                    part[j:j + (1 << 24)].tofile(f)
                    bars.advance(task, min(1 << 24, len(part) - j))
            np.save(tmp / f"{name}.docs.npy", _offsets(doc_lens[in_split]))
            np.save(tmp / f"{name}.sents.npy", _offsets(sent_lens[sent_mask]))
            splits[name] = {"documents": int(in_split.sum()), "sentences": int(sent_mask.sum()),
                            "tokens": len(part), "bytes": int(doc_bytes[in_split].sum())}
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {"sha256": tok.sha256, "path": str(tok.path), "size": tok.size},
            "source": {"kind": source.kind, "description": source.description, "fingerprint": source.fingerprint,
                       "files": source.files[:1000], "n_files": len(source.files)},
            "reading": {"doc_per": cfg.doc_per, "text_field": cfg.text_field},
            "split": {"valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed},
            "dtype": dtype.name,
            "splits": splits,
            "replaced_bytes": int(read_stats.get("replaced_bytes", 0)),
            "build": {**timings, "tokens_per_s": len(tokens) / max(timings["tokenize_seconds"], 1e-9),
                      "threads": threads},
        }
        if source.kind == "builtin":
            from pretrain import corpus

            meta["corpus"] = corpus.corpus_info(docs)  # name, Python version, sha256 of the text, counts
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
        try:
            os.replace(tmp, path)
        except OSError:  # another prepare renamed the same inputs' cache into place first: use theirs
            if not (path / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache.open(path)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(n+1,) int64 offsets [0, l0, l0+l1, ...] of consecutive pieces with the given lengths."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
