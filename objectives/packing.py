"""Packing: several short examples share a row instead of each padding one (the packed-BERT idea; HF's
`DataCollatorWithFlattening` for decoders). The model keeps attention within each example and restarts its
positions (`example_ids`, models/cache.py `packed_masks`), so an example computes what it would alone.

Examples are placed first-fit, in the order they were drawn: each goes into the first row with room for it,
opens the next row when none has room, and the first example that fits in none of the `B` rows ends the batch.
So the examples of a packed batch are a prefix of the examples drawn, whatever their lengths: packing selects
nothing, and the statistics of the examples (NSP's label rate, the masked fraction of each) are those of the
unpacked objective. First-fit lets later short examples fill the tails that next-fit (a row closed as soon as
one example overflows it) leaves empty: BERT's pairs on the built-in corpus fill 92-98% of their rows instead of
80%. An example always goes to the end of its row, so a row's examples lie in drawn order. BART's blocks are
placed the same way (objectives/sentences.py), then each row's tail gets one more block drawn for it; an
encoder-decoder numbers the examples of both stacks' rows, and cross-attention stays within each too.

The rows are written from the examples' offsets alone (`row_major`): the caller computes each packed token from
(example, index inside it), so nothing is built at the full row width per example.
"""

from __future__ import annotations

import numpy as np
import torch

from objectives.base import IGNORE_INDEX

SWITCHES = ("pack", "doc_attention")  # objective fields that, when true, put several examples in a row


class FirstFit:
    """First-fit in drawn order (module docstring) of examples into `rows` rows of `width` tokens, fed in rounds:
    `add(lengths)` places the next examples until one fits nowhere. A loop over examples and the open rows, in
    plain Python lists: for 64 rows it runs twice as fast as a numpy comparison per example."""

    def __init__(self, rows: int, width: int):
        self.width, self.rows = width, rows
        self.filled: list[int] = []  # tokens in each open row
        self.row: list[int] = []
        self.off: list[int] = []

    @property
    def used(self) -> np.ndarray:
        """(rows,) tokens in each row, 0 in the rows not opened."""
        out = np.zeros(self.rows, np.int64)
        out[: len(self.filled)] = self.filled
        return out

    def add(self, lengths: np.ndarray) -> bool:
        """Place these examples after the ones before; returns whether the batch is complete (False: every
        example was placed, and more are needed to fill the rows)."""
        filled, width = self.filled, self.width
        for n in lengths.tolist():
            room, r = width - n, 0
            for u in filled:  # the first open row with room
                if u <= room:
                    break
                r += 1
            if r == len(filled):  # none: open the next, unless there is none or the example fits no row
                if r == self.rows or room < 0:
                    return True
                filled.append(0)
            self.row.append(r)
            self.off.append(filled[r])
            filled[r] += n
        return False

    def placed(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, offsets) of the examples placed so far, in drawn order."""
        return np.asarray(self.row, np.int64), np.asarray(self.off, np.int64)


def slots(row: np.ndarray) -> np.ndarray:
    """(k,) the place of each example within its row (0, 1, ...), examples in drawn order."""
    order = np.argsort(row, kind="stable")
    r = row[order]
    idx = np.arange(len(r))
    first = np.ones(len(r), bool)
    first[1:] = r[1:] != r[:-1]
    out = np.empty(len(r), np.int64)
    out[order] = idx - np.maximum.accumulate(np.where(first, idx, 0))
    return out


def row_major(row: np.ndarray, off: np.ndarray, shape: tuple[int, int]):
    """The packed rows (shape (B, T), row 0 holding an example at offset 0, as first-fit places them) position by
    position: in row-major order each example's positions run from its first to the next example's (the padding
    after a row's last example included), so an example's value at all its positions is the value repeated.
    Returns (each, local): each(v) maps a value per placed example (k,), in drawn order, to every position
    (B * T,) int32; local (B * T,) is each position's index within its example (>= its length on padding)."""
    B, T = shape
    order = np.lexsort((off, row))  # row-major; a row's examples are in drawn order already
    base = row[order] * T + off[order]
    seg = np.diff(base, append=B * T)

    def each(v: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(v)[order].astype(np.int32), seg)

    return each, np.arange(B * T, dtype=np.int32) - np.repeat(base.astype(np.int32), seg)


def per_example(values: torch.Tensor, row: np.ndarray, slot: np.ndarray, rows: int) -> torch.Tensor:
    """(rows, E) per-example values (an NSP label, say) at each example's slot, IGNORE_INDEX where a row has
    fewer than E examples."""
    out = torch.full((rows, int(slot.max()) + 1 if len(slot) else 1), IGNORE_INDEX, dtype=values.dtype)
    out[torch.from_numpy(row), torch.from_numpy(slot)] = values[: len(row)]
    return out


def within_examples(score: torch.Tensor, word_len: torch.Tensor, group: torch.Tensor):
    """Words (or pieces) of packed rows (B, T) in random order within each example, for masking each example with
    its own budget (objectives/mlm.py). One int64 key per word holds its example, its score and its position
    (high to low bits), so sorting the keys' values orders the examples apart, each by score, and carries the
    positions along: 2-3x faster than an argsort. The score is exact in 26 bits: torch.rand's float32 draws on
    CPU are multiples of 2^-24, and 2.0 marks a non-word. Returns, in that order, the word positions, their
    scores, each word's running piece count from its example's start, and its example; all (B, T)."""
    B, T = score.shape
    pos_bits = max(1, (T - 1).bit_length())
    if int(group.max()).bit_length() > 63 - 26 - pos_bits:  # rows of millions of tokens holding ~1M examples
        raise ValueError(f"{int(group.max())} examples in a row of {T} do not fit one sort key")
    key = (group.numpy().astype(np.int64) << (pos_bits + 26)) | ((score.numpy() * 2.0**24).astype(np.int64) << pos_bits)
    key |= np.arange(T)
    key.sort(axis=1)
    order = torch.from_numpy(key & ((1 << pos_bits) - 1))
    sorted_score = torch.from_numpy(((key >> pos_bits) & ((1 << 26) - 1)).astype(np.float32) * 2.0**-24)
    g = torch.from_numpy(key >> (pos_bits + 26))
    count = word_len.gather(1, order).cumsum(1)
    # The keys sort a row's examples apart, so the pieces before a word in other examples are those of the
    # examples numbered below its own.
    pieces = torch.zeros(B, int(g.max()) + 1, dtype=count.dtype).scatter_add_(1, group, word_len)  # per example
    count -= (pieces.cumsum(1) - pieces).gather(1, g)
    return order, sorted_score, count, g
