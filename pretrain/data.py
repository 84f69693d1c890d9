"""Raw text -> token cache on disk -> the token arrays objectives draw batches from.

A split of the cache is three arrays: every document's tokens back to back with no separator (objectives
add `</s>` or nothing, as their paper does), document offsets and sentence offsets (sentence boundaries are
found once, at prepare time). On disk (pretrain/shards.py, pretrain/manifest.py) the tokens live in shards
of at most `data.shard_tokens` tokens; here a split's `tokens` is one memory map (one shard) or a
`ShardedTokens` that gathers global positions from the shards' memory maps, and the offsets are memory-mapped
global arrays: opening a cache of any size costs a few KB of memory, and nothing is ever loaded whole.
Megatron-LM's `megatron/core/datasets/indexed_dataset.py` (`IndexedDataset` over .bin/.idx pairs, memory-
mapped) and nanoGPT's `data/openwebtext/prepare.py` (one uint16 memmap per split) are the models.

Building the cache is `prepare` (pretrain/prepare.py): stream the source, tokenize on all cores, write
shards, merge. Reading text and splitting sentences live in pretrain/stream.py and pretrain/text.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.errors import UserError
from pretrain.manifest import held_out
from pretrain.shards import FORMAT_VERSION, SPLITS
from pretrain.stream import Source, read_documents, resolve_source
from pretrain.text import split_sentences

__all__ = ["TokenSplit", "ShardedTokens", "TokenCache", "Prepared", "prepare", "held_out", "read_documents",
           "resolve_source", "split_sentences", "Source", "FORMAT_VERSION"]

if TYPE_CHECKING:
    from pretrain.config import DataConfig
    from pretrain.tokenizer import Tokenizer


class ShardedTokens:
    """The tokens of a split stored in several files, indexed like a 1-D array of global positions.

    `tokens[idx]` for an integer array of any shape maps every position to (segment, local position) with one
    `np.searchsorted` and gathers from each segment's memory map (a loop over the few segments a batch
    touches, never over tokens); slices, integers and `len` work as for an array. `np.asarray(tokens)`
    reads every token into memory: use indexing (or `TokenSplit.unigram_counts`) instead. Pickles as its
    file list and reopens the memory maps in the receiving process.
    """

    def __init__(self, files: list[str], ranges: list[tuple[int, int]], dtype: str):
        self.files, self.ranges, self.dtype = list(files), [tuple(r) for r in ranges], np.dtype(dtype)
        lens = np.array([b - a for a, b in self.ranges], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)  # (K+1,) global start of each
        self._maps: list[np.ndarray] | None = None

    def __reduce__(self):
        return (ShardedTokens, (self.files, self.ranges, self.dtype.str))

    @property
    def maps(self) -> list[np.ndarray]:
        """Each segment as a read-only memory map (opened on first use)."""
        if self._maps is None:
            # Plain ndarray views of the maps: indexing a np.memmap wraps every result in a memmap (~4 us a call).
            self._maps = [np.asarray(np.memmap(f, dtype=self.dtype, mode="r")[a:b])
                          for f, (a, b) in zip(self.files, self.ranges, strict=True)]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        """(N,), as an array's."""
        return (len(self),)

    ndim = 1

    def __getitem__(self, idx: Any) -> Any:
        n = len(self)
        if isinstance(idx, slice):
            lo, hi, step = idx.indices(n)
            if step != 1:
                return self[np.arange(lo, hi, step)]
            k0, k1 = np.searchsorted(self.starts, [lo, max(hi - 1, lo)], side="right") - 1
            parts = [self.maps[k][max(lo - self.starts[k], 0):hi - self.starts[k]] for k in range(k0, k1 + 1)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + n if idx < 0 else int(idx)
            if not 0 <= i < n:
                raise IndexError(f"index {idx} is out of bounds for {n} tokens")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.maps[k][i - self.starts[k]]
        pos = np.asarray(idx)
        flat = pos.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of bounds for {n} tokens")
        seg = np.searchsorted(self.starts, flat, side="right") - 1  # (M,) segment of each position
        out = np.empty(flat.shape, self.dtype)
        for k in np.unique(seg):
            sel = seg == k
            out[sel] = self.maps[k][flat[sel] - self.starts[k]]
        return out.reshape(pos.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.maps) if self.maps else np.zeros(0, self.dtype)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens in {len(self.files)} segments)"


@dataclass(frozen=True, eq=False)
class TokenSplit:
    """One split (train or valid) of the token cache.

    tokens:       (N,) uint16/uint32: all documents back to back, no separators; a read-only memory map, or a
                  `ShardedTokens` over several shards (index it with integer arrays of any shape or slices).
    doc_offsets:  (D+1,) int64: document d is tokens[doc_offsets[d]:doc_offsets[d+1]]; doc_offsets[0] = 0.
    sent_offsets: (S+1,) int64: sentence s is tokens[sent_offsets[s]:sent_offsets[s+1]]; every document
                  start is a sentence start, and sent_offsets[-1] = N.
    n_bytes:      UTF-8 bytes of the split's text (for bits per byte).
    A split opened from a cache memory-maps every array and pickles as (cache folder, split name).
    """

    tokens: Any
    doc_offsets: np.ndarray
    sent_offsets: np.ndarray
    n_bytes: int = 0
    where: tuple[str, str] | None = field(default=None, repr=False)  # (cache folder, split) when opened from one

    def __reduce__(self):
        if self.where is not None:
            return (_open_split, self.where)  # the memory maps are reopened, never pickled
        return (TokenSplit, (self.tokens, self.doc_offsets, self.sent_offsets, self.n_bytes))

    @property
    def n_tokens(self) -> int:
        """N, the split's tokens."""
        return int(self.doc_offsets[-1])

    @property
    def n_docs(self) -> int:
        """D, the split's documents."""
        return len(self.doc_offsets) - 1

    @property
    def n_sents(self) -> int:
        """S, the split's sentences."""
        return len(self.sent_offsets) - 1

    @cached_property
    def sent_doc(self) -> np.ndarray:
        """(S,) int64: the document each sentence belongs to."""
        return np.searchsorted(self.doc_offsets, self.sent_offsets[:-1], side="right") - 1

    @cached_property
    def doc_first_sent(self) -> np.ndarray:
        """(D+1,) int64: sentences of document d are doc_first_sent[d]:doc_first_sent[d+1]."""
        return np.searchsorted(self.sent_offsets, self.doc_offsets, side="left")

    @cached_property
    def stream_starts(self) -> np.ndarray:
        """(D,) int64: where document d starts in the stream that puts one separator token after every
        document (doc_offsets[d] + d), computed once per split rather than once per batch."""
        return np.asarray(self.doc_offsets[:-1], np.int64) + np.arange(self.n_docs, dtype=np.int64)

    def unigram_counts(self, size: int) -> np.ndarray:
        """(size,) int64 count of every token id in the split (ids >= size are dropped): read from the cache
        (counted at prepare time), or counted in blocks of 16M tokens for an in-memory split."""
        if self.where is not None:
            counts = np.load(Path(self.where[0]) / f"{self.where[1]}.unigram.npy")
        else:
            counts = np.zeros(size, np.int64)
            for i in range(0, self.n_tokens, 1 << 24):
                block = np.asarray(self.tokens[i:i + (1 << 24)])
                counts += np.bincount(block, minlength=size)[:size]
        out = np.zeros(size, np.int64)
        out[: min(size, len(counts))] = counts[:size]
        return out

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


def _open_split(path: str, name: str) -> TokenSplit:
    """Unpickle a TokenSplit: reopen its cache (validated again) and memory-map the split."""
    return TokenCache.open(path).split(name)


class TokenCache:
    """A prepared token cache folder: manifest.json, the shards of its parts and the global offsets (see
    pretrain/manifest.py). Open one with `TokenCache.open(path)`; `split("train")` gives a memory-mapped
    TokenSplit."""

    def __init__(self, path: Path, meta: dict):
        """Use `TokenCache.open`, which validates the folder."""
        self.path = path
        self.meta = meta
        self._splits: dict[str, TokenSplit] = {}

    @classmethod
    def open(cls, path: Path | str) -> TokenCache:
        """Open and validate a cache folder: UserError unless its manifest exists, says complete, was written
        by this format version, and every file it names has the size it records (a stat each, no reading)."""
        path = Path(path)
        fix = "delete the folder and run `pretrain prepare` again"
        try:
            meta = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            if any(path.glob("part-*")):
                raise UserError(f"{path} is not complete (a prepare was interrupted or parts are unmerged); run "
                                "the same `pretrain prepare` again to continue it, or `pretrain prepare --merge`") \
                    from None
            raise UserError(f"{path} is not a complete token cache (no manifest.json); {fix}") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}/manifest.json is unreadable ({e}); {fix}") from None
        if meta.get("format_version") != FORMAT_VERSION or not meta.get("complete"):
            raise UserError(f"{path} was written by cache format {meta.get('format_version')}, this version reads "
                            f"{FORMAT_VERSION}; {fix}")
        try:
            for rel, size in meta["files"].items():
                if (path / rel).stat().st_size != size:
                    raise UserError(f"{path} is corrupt ({rel} has {(path / rel).stat().st_size} bytes, the manifest "
                                    f"says {size}); {fix}")
            for name in SPLITS:
                m = meta["splits"][name]
                for arr, n in (("docs", m["documents"] + 1), ("sents", m["sentences"] + 1)):
                    if np.load(path / f"{name}.{arr}.npy", mmap_mode="r").shape != (n,):
                        raise UserError(f"{path} is corrupt ({name}.{arr}.npy does not match the manifest); {fix}")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is incomplete or corrupt ({e}); {fix}") from None
        build = path / "build.json"
        meta["build"] = json.loads(build.read_text()) if build.is_file() else {}
        return cls(path, meta)

    def split(self, name: str) -> TokenSplit:
        """The "train" or "valid" split, every array memory-mapped read-only."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._splits:
            m = self.meta["splits"][name]
            segs = m["segments"]
            files = [str(self.path / g["shard"] / f"{g['file']}.bin") for g in segs]
            tokens = ShardedTokens(files, [g["tokens"] for g in segs], self.meta["dtype"])
            if len(segs) == 1:
                tokens = tokens.maps[0]  # one shard: a plain memory map (np.asarray costs nothing)

            def load(arr: str) -> np.ndarray:
                """One global array of the split, memory-mapped."""
                return np.asarray(np.load(self.path / f"{name}.{arr}.npy", mmap_mode="r"))  # a view, still mapped

            split = TokenSplit(tokens=tokens, doc_offsets=load("docs"), sent_offsets=load("sents"),
                               n_bytes=int(m["bytes"]), where=(str(self.path), name))
            split.__dict__["sent_doc"] = load("sent_doc")  # precomputed at prepare time, memory-mapped too
            split.__dict__["doc_first_sent"] = load("doc_first_sent")
            self._splits[name] = split
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
    """Build (or reuse, or continue, or merge) the tokenizer and token cache for `cfg`; returns them with stats.

    A trained tokenizer gets `extra_pieces` (the objective's own special pieces) after the fixed ones; a given
    one must have them. See pretrain/prepare.py for the steps. stats: documents, sentences, tokens, bytes
    (totals), "train"/"valid" dicts of the same, replaced_bytes, reused, seconds (this call), read_seconds,
    tokenizer_seconds, tokenize_seconds and tokens_per_s (of the build; from build.json when reused),
    shards, shards_built, shards_resumed, workers, source, path, tokenizer_path, vocab_size, dtype.
    """
    from pretrain.prepare import prepare_cache

    return prepare_cache(cfg, tuple(extra_pieces), progress, console)
