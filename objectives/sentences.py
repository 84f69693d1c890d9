"""BART's blocks of whole sentences (objectives/denoise.py), one to a row or packed several to a row, and the
permutation of their sentences.

A block starts at a sentence and takes whole consecutive sentences while they fit in seq_len - 2 tokens (a
first sentence that does not fit alone is cut), framed `<s> ... </s>`; with `cross_documents` it may run on
into the next document, else it stops at its document's end. Packed, blocks are drawn in rounds and placed
first-fit in drawn order into rows of seq_len (objectives/packing.py): those blocks are a prefix of the drawn
ones, each the block it would be alone, so first-fit changes no block and selects none. It leaves each row the
room its next block did not fit in (12% of a row on the built-in corpus, whose blocks are long when they run
across documents). So each row with TAIL_ROOM or more content tokens left then takes one more block, started at
a uniformly random sentence and drawn for that room by the same rule (whole sentences while they fit, else the
first one cut). Every row, packed or not, is described the same way (`Blocks`), and the noise works block by
block within the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from objectives.packing import FirstFit, row_major, slots

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


TAIL_ROOM = 8  # content tokens of room a packed row needs left for its last, tail-filling block


@dataclass(frozen=True)
class Blocks:
    """Rows of clean blocks `<s> content </s>` back to back, then padding; all (B, T) unless said."""

    ids: torch.Tensor  # token ids, pads after a row's last block
    ex: torch.Tensor  # the block of each position within its row: 1, 2, ...; 0 on padding
    inside: torch.Tensor  # bool: a position of a block (ex > 0), frames included
    content: torch.Tensor  # bool: a block's content token (not `<s>`, `</s>` or padding)
    eos: torch.Tensor  # bool: a block's `</s>`
    sent_first: torch.Tensor  # bool: the first token of each sentence
    first: torch.Tensor  # (B, E) the position of each block's `<s>` in its row (E: the most blocks in a row)
    n: torch.Tensor  # (B, E) content tokens of each block; 0 where a row has fewer than E blocks
    sent_len: torch.Tensor  # (B, K) tokens of each sentence of a row, in order (K: the most sentences in a row)
    sent_block: torch.Tensor  # (B, K) the block (1, 2, ...) of each; 0 past a row's sentences


def block_spans(split: TokenSplit, first_sent: np.ndarray, room: int, cross_documents: bool):
    """The blocks starting at sentences `first_sent` (k,) with `room` content tokens: (first token (k,),
    content tokens n (k,), end (k,): the sentence after the last one)."""
    so = split.sent_offsets
    a = so[first_sent]
    end = np.searchsorted(so, a + room, side="right") - 1  # sentences first_sent..end-1 fit in room tokens
    if not cross_documents:
        end = np.minimum(end, split.doc_first_sent[split.sent_doc[first_sent] + 1])
    end = np.maximum(end, first_sent + 1)  # at least one (cut) sentence
    return a, np.minimum(so[end] - a, room), end


def write_blocks(split: TokenSplit, vocab: Vocab, first_sent: np.ndarray, spans, row: np.ndarray, off: np.ndarray,
                 shape: tuple[int, int]) -> Blocks:
    """The rows (shape (B, T), each with a block at offset 0) holding blocks `first_sent` (k,) with their spans
    (`block_spans`) at rows `row` and offsets `off`, trimmed to the widest row; each array is written in one pass
    over the rows (`packing.row_major`)."""
    (a, n, end), (B, T) = spans, shape
    each, local = row_major(row, off, shape)
    n_pos = each(n)
    content = (local >= 1) & (local <= n_pos)
    ids = np.where(content, np.take(split.tokens, each(a - 1) + local, mode="clip"), vocab.pad)
    base = row * T + off  # (k,) flat position of each block's `<s>`
    ids[base], ids[base + n + 1] = vocab.bos, vocab.eos
    eos = np.zeros(B * T, bool)
    eos[base + n + 1] = True
    slot = slots(row)
    inside = local <= n_pos + 1
    ex = np.where(inside, each(slot + 1), 0)
    k = end - first_sent  # sentences per block; sentence j of block b starts at offset so[first_sent + j] - a
    blk = np.repeat(np.arange(len(k)), k)
    s = first_sent[blk] + np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    start = split.sent_offsets[s] - a[blk]
    sent_first = np.zeros(B * T, bool)
    sent_first[base[blk] + 1 + start] = True
    first, nn = np.zeros((B, slot.max() + 1), np.int64), np.zeros((B, slot.max() + 1), np.int64)
    first[row, slot], nn[row, slot] = off, n
    # The rows' sentences in order (by block, row-major, then within it), for the permutation.
    in_order = np.argsort(base[blk], kind="stable")
    s_row = row[blk][in_order]
    j = np.arange(len(s_row)) - np.searchsorted(s_row, s_row)  # each sentence's place in its row
    sent_len, sent_block = np.zeros((2, B, int(j.max()) + 1), np.int64)
    sent_len[s_row, j] = (np.minimum(split.sent_offsets[s + 1] - a[blk], n[blk]) - start)[in_order]
    sent_block[s_row, j] = (slot + 1)[blk][in_order]
    width = int((off + n + 2).max())
    cut = [torch.from_numpy(x.reshape(B, T)[:, :width]) for x in
           (ids.astype(np.int64), ex.astype(np.int64), inside, content, eos, sent_first)]
    return Blocks(*cut, *(torch.from_numpy(x) for x in (first, nn, sent_len, sent_block)))


def one_per_row(split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, T: int, cross: bool) -> Blocks:
    """B blocks from uniformly random sentences, one per row."""
    starts = torch.randint(0, split.n_sents, (B,), generator=gen).numpy()
    rows = np.arange(B)
    return write_blocks(split, vocab, starts, block_spans(split, starts, T - 2, cross), rows, 0 * rows, (B, T))


def packed(split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, T: int, cross: bool) -> Blocks:
    """Blocks from uniformly random sentences, drawn 2B at a time and placed first-fit until one fits in none of
    the B rows of T; then each row with at least TAIL_ROOM content tokens of room left gets one more block, drawn
    for that room (the module docstring)."""
    packer, parts = FirstFit(B, T), []
    while True:
        starts = torch.randint(0, split.n_sents, (2 * B,), generator=gen).numpy()
        spans = block_spans(split, starts, T - 2, cross)
        parts.append((starts, *spans))
        if packer.add(spans[1] + 2):
            break
    row, off = packer.placed()
    drawn = [np.concatenate(p)[: len(row)] for p in zip(*parts, strict=True)]  # starts, a, n, end of the placed
    used = packer.used
    room = T - 2 - used  # (B,) content tokens a last block of each row may take
    tail = np.flatnonzero(room >= TAIL_ROOM)
    starts = torch.randint(0, split.n_sents, (B,), generator=gen).numpy()[tail]  # one draw per row, used or not
    last = (starts, *block_spans(split, starts, room[tail], cross))
    starts, a, n, end = (np.concatenate([d, t]) for d, t in zip(drawn, last, strict=True))
    return write_blocks(split, vocab, starts, (a, n, end), np.concatenate([row, tail]),
                        np.concatenate([off, used[tail]]), (B, T))


def permute_sentences(blocks: Blocks, ratio: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle ceil(k * ratio) randomly chosen sentences of each block (k: its sentences) among their own slots
    (fairseq's `permute_sentences`); frames and padding stay. Returns the rows' (ids, sent_first), each (B, T)."""
    ids, sent_first, content = blocks.ids, blocks.sent_first, blocks.content
    B, T = ids.shape
    lens, group = blocks.sent_len, blocks.sent_block  # (B, K)
    K = lens.size(1)
    sid = torch.cumsum(sent_first, 1)  # (B, T) each content token's sentence in its row, from 1
    r = torch.arange(K)
    valid = group > 0
    E1 = blocks.n.size(1) + 1
    if ratio < 1.0:  # the block's sentences with the smallest random keys; keys sort blocks apart first
        count = torch.zeros(B, E1, dtype=torch.long).scatter_add_(1, group, valid.long())  # sentences per block
        n_perm = torch.ceil(count * ratio).long().gather(1, group)  # (B, K) how many of its block's to shuffle
        key = (group + torch.rand(B, K, generator=gen, dtype=torch.float64)).masked_fill(~valid, float(E1))
        rank = key.argsort(1).argsort(1) - (count.cumsum(1) - count).gather(1, group)  # rank within its block
        chosen = valid & (rank < n_perm)
    else:
        chosen = valid
    # Chosen slots in position order receive the chosen sentences, block by block, in random order.
    slot_order = torch.where(chosen, r, K + r).argsort(1)  # (B, K)
    shuffled = group + torch.rand(B, K, generator=gen, dtype=torch.float64)
    sent_order = torch.where(chosen, shuffled, float(E1) + r).argsort(1)  # (B, K)
    ordering = torch.empty_like(slot_order).scatter_(1, slot_order, sent_order)  # slot t holds sentence ordering[t]
    old_start = lens.cumsum(1) - lens  # (B, K) in content tokens, which a block's sentences fill contiguously
    slot_len = lens.gather(1, ordering)
    new_start = torch.empty_like(lens).scatter_(1, ordering, slot_len.cumsum(1) - slot_len)  # per sentence
    shift = F.pad(new_start - old_start, (1, 0)).gather(1, sid).mul_(content)  # (B, T), 0 off content
    new_pos = shift.add_(torch.arange(T))  # a permutation of 0..T-1 in every row
    out_ids = torch.empty_like(ids).scatter_(1, new_pos, ids)
    return out_ids, torch.empty_like(sent_first).scatter_(1, new_pos, sent_first)
