"""Sentencepiece tokenizer: training, loading, and the special-token ids every objective needs.

Fixed ids shared by every objective (one tokenizer serves all of them):
    0 <pad>   1 <unk>   2 <s>   3 </s>   4 [CLS]   5 [SEP]   6 [MASK]   7..106 <extra_id_0>..<extra_id_99>
The specials are sentencepiece *control* pieces: they are never produced from text, so a literal
"[MASK]" or "<pad>" in a document stays text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAD, UNK, BOS, EOS, CLS, SEP, MASK = range(7)
N_SENTINELS = 100
SENTINEL0 = 7  # <extra_id_k> has id SENTINEL0 + k
SPECIAL_PIECES = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"] + [
    f"<extra_id_{k}>" for k in range(N_SENTINELS)
]
N_SPECIAL = len(SPECIAL_PIECES)  # 107: ids below this are special


@dataclass(frozen=True, eq=False)
class Vocab:
    """What objectives need to know about the vocabulary, without sentencepiece.

    Arrays have one entry per id (length `size`). Build one from a tokenizer (`Tokenizer.vocab`) or by
    hand in tests (`Vocab.synthetic`).
    """

    size: int
    special: np.ndarray  # (V,) bool: pad, unk, bos, eos, cls, sep, mask, sentinels (never corrupted or drawn)
    word_start: np.ndarray  # (V,) bool: the piece begins a word (starts with the "▁" boundary mark)
    piece_bytes: np.ndarray  # (V,) int64: UTF-8 bytes the piece stands for (▁ counts 1, byte pieces 1, specials 0)
    pad: int = PAD
    unk: int = UNK
    bos: int = BOS
    eos: int = EOS
    cls: int = CLS
    sep: int = SEP
    mask: int = MASK

    def sentinel(self, k: int) -> int:
        """Id of <extra_id_k>."""
        return SENTINEL0 + k

    @cached_property
    def ordinary_ids(self) -> torch.Tensor:
        """(n,) int64 ids that random replacement may draw: every non-special piece."""
        import torch

        return torch.from_numpy(np.flatnonzero(~self.special)).long()

    @cached_property
    def special_t(self) -> torch.Tensor:
        """`special` as a torch bool tensor."""
        import torch

        return torch.from_numpy(self.special.copy())

    @cached_property
    def word_start_t(self) -> torch.Tensor:
        """`word_start` as a torch bool tensor."""
        import torch

        return torch.from_numpy(self.word_start.copy())

    @cached_property
    def piece_bytes_t(self) -> torch.Tensor:
        """`piece_bytes` as a torch int64 tensor."""
        import torch

        return torch.from_numpy(self.piece_bytes.astype(np.int64))

    @classmethod
    def synthetic(cls, size: int = 1000, word_start_every: int = 1) -> Vocab:
        """A vocabulary for tests: the fixed specials, then ordinary pieces; every `word_start_every`-th
        ordinary id starts a word (1 = all of them)."""
        special = np.zeros(size, bool)
        special[:N_SPECIAL] = True
        ids = np.arange(size)
        word_start = (~special) & ((ids - N_SPECIAL) % word_start_every == 0)
        piece_bytes = np.where(special, 0, 3).astype(np.int64)
        return cls(size=size, special=special, word_start=word_start, piece_bytes=piece_bytes)
