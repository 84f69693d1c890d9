"""Packing: several short examples share a row instead of each padding one (the packed-BERT idea; HF's
`DataCollatorWithFlattening` for decoders). The model keeps attention within each example and restarts its
positions (`example_ids`, models/cache.py `packed_masks`), so an example computes what it would alone.

Examples are placed first-fit, in the order they were drawn: each goes into the first row with room for it,
opens the next row when none has room, and the first example that fits in none of the `B` rows ends the batch.
So the examples of a packed batch are a prefix of the examples drawn, whatever their lengths: packing selects
nothing, and the statistics of the examples (NSP's label rate, the masked fraction of each) are those of the
unpacked objective. First-fit lets later short examples fill the tails that next-fit (a row closed as soon as
one example overflows it) leaves empty: BERT's pairs on the built-in corpus fill 92-98% of their rows instead of
80%. A row's examples are then not in drawn order; `in_row_order` sorts them before `place`.
"""

from __future__ import annotations

import numpy as np
import torch

from objectives.base import IGNORE_INDEX

SWITCHES = ("pack", "doc_attention")  # objective fields that, when true, put several examples in a row


def first_fit(lengths: np.ndarray, rows: int, width: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Row and offset of each of the first examples that fit, first-fit in drawn order (module docstring), into
    `rows` rows of `width` tokens, and whether the batch ended on an example that fits nowhere (False: every
    example was placed, and more are needed to fill the rows). A loop over examples, not tokens."""
    row, off = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    used = np.zeros(rows, np.int64)  # tokens in each row
    opened = 0
    for i, n in enumerate(lengths.tolist()):
        room = np.flatnonzero(used[:opened] + n <= width)
        if len(room):
            r = int(room[0])
        elif opened < rows:
            r, opened = opened, opened + 1
        else:
            return row[:i], off[:i], True
        row[i], off[i] = r, used[r]
        used[r] += n
    return row, off, False


def in_row_order(row: np.ndarray, off: np.ndarray) -> np.ndarray:
    """The permutation that sorts placed examples by row, then offset (what `place` and `per_example` expect)."""
    return np.lexsort((off, row))


def place(fields: dict[str, torch.Tensor], lengths: torch.Tensor, where: tuple[np.ndarray, np.ndarray],
          shape: tuple[int, int], fill: dict[str, int]) -> dict[str, torch.Tensor]:
    """Packed rows (B, T) of per-token `fields` (each (N, W): example i's tokens are its first lengths[i]), the
    examples at rows/offsets `where` (only the first len(where[0]) examples are placed); positions no example
    fills hold `fill[name]`. Adds `example_ids` (B, T): 1, 2, ... for the examples of a row, 0 on padding."""
    row, off = (torch.from_numpy(a) for a in where)
    k, (B, T) = len(row), shape
    n = lengths[:k]
    ex = torch.repeat_interleave(torch.arange(k), n)  # (tokens,) the example of each placed token
    local = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)  # (tokens,) index inside it
    r, c = row[ex], off[ex] + local
    out = {}
    for name, t in fields.items():
        packed = torch.full((B, T), fill[name], dtype=t.dtype)
        packed[r, c] = t[ex, local]
        out[name] = packed
    slot = slots(row)  # (k,) the example's place in its row
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[r, c] = slot[ex] + 1
    out["example_ids"] = ids
    return out


def slots(row: torch.Tensor) -> torch.Tensor:
    """(k,) index of each example within its row, for examples placed in row order."""
    idx = torch.arange(len(row))
    first = torch.ones(len(row), dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    return idx - torch.where(first, idx, 0).cummax(0).values


def per_example(values: torch.Tensor, row: np.ndarray, rows: int) -> torch.Tensor:
    """(rows, E) per-example values (an NSP label, say) at each example's slot, IGNORE_INDEX where a row has
    fewer than E examples."""
    r = torch.from_numpy(row)
    s = slots(r)
    out = torch.full((rows, int(s.max()) + 1 if len(s) else 1), IGNORE_INDEX, dtype=values.dtype)
    out[r, s] = values[: len(r)]
    return out
