"""Raw text -> token cache on disk -> the token arrays objectives draw batches from.

A split of the cache is three arrays: every document's tokens back to back with no separator (objectives
add `</s>` or nothing, as their paper does), document offsets and sentence offsets (sentence boundaries
are found once, at prepare time).

Reading (`read_documents`). `data.source` is one of:
  ""            the built-in corpus (pretrain/corpus.py: the standard library's docstrings);
  a file        .txt: a document per blank-line-separated block (or per line with data.doc_per="line"),
                line breaks normalized to "\n" and each document stripped of surrounding whitespace;
                .jsonl / .json: the `data.text_field` string of each object (.json: a list of objects, an
                object holding one such list, or JSON lines); .parquet: the `data.text_field` column;
                any other suffix is read as .txt;
  a folder      every .txt/.jsonl/.json/.parquet file under it, sorted by path; a folder without such
                files (a saved or scripted dataset, CSV files, ...) goes to `datasets`;
  a glob        ("data/*.jsonl", "corpus/**/*.txt") the matching files of those types, sorted;
  otherwise     a dataset name: `datasets.load_dataset(name, data.dataset_config, split=data.dataset_split)`.
Local files are read with plain Python (and pyarrow for Parquet, as `datasets` does) rather than through
`datasets`: the errors can name the file and line, invalid UTF-8 bytes can be counted, and no second
Arrow copy of the text lands in the Hugging Face cache. Invalid UTF-8 bytes are replaced by U+FFFD and
counted (`replaced_bytes`); a file with NUL bytes or mostly invalid UTF-8 is not text (UserError).
Whitespace-only documents are dropped.

Cache (`prepare`). The folder `<cache_dir>/<key>/` holds, per split (train, valid): `<split>.bin` (flat
uint16 tokens, uint32 when the vocabulary exceeds 65535), `<split>.docs.npy` and `<split>.sents.npy`
(int64 offsets), and `meta.json`. The key hashes everything the content depends on (tokenizer sha256,
source fingerprint, reading options, split options, FORMAT_VERSION), so a cache is reused exactly when its
inputs are unchanged. The source fingerprint is cheap: sha256 of the files' bytes, the built-in corpus's
file stats (corpus.corpus_fingerprint), or the dataset's `_fingerprint`. A trained tokenizer is kept in
`<cache_dir>/tokenizers/<key>.model`, keyed the same way. A cache is built in a temporary folder and
renamed into place in one `os.replace`, with meta.json written last: an interrupted prepare leaves no
folder that `TokenCache.open` accepts.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import DataConfig
    from pretrain.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the cache layout or the sentence rule changes: old caches are then rebuilt
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
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
