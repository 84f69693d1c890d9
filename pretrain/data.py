"""Raw text -> token cache on disk -> the token arrays objectives draw batches from.

A split of the cache is three arrays: every document's tokens back to back with no separator (objectives
add `</s>` or nothing, as their paper does), document offsets and sentence offsets (sentence boundaries
are found once, at prepare time).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


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
