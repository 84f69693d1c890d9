"""The KV cache of incremental decoding and the attention masks every stack builds (padding, causal, relative
bias); the protocol is in the docstring of `models/transformer.py`."""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers import KV


class KVCache:
    """Keys and values kept across decoding steps (the protocol is in the docstring of `models/transformer.py`)."""

    def __init__(self) -> None:
        self.self_kv: dict[int, KV] = {}  # decoder layer -> self-attention (k, v), each (B, nh, L, hs)
        self.cross_kv: dict[int, KV] = {}  # decoder layer -> cross-attention (k, v), each (B, nh, S, hs)
        self.mask: Tensor | None = None  # (B, L) bool, True = real token; None = every token real
        self.memory_mask: Tensor | None = None  # (B, 1, 1, S) bool cross-attention mask
        self.length = 0  # L: tokens cached so far, padding included

    def grow_mask(self, new: Tensor | None, B: int, T: int) -> Tensor | None:
        """Record the padding mask of T new tokens; return the mask over cache + new tokens (B, L + T)."""
        if new is None and self.mask is None:
            return None
        if new is None:
            new = torch.ones(B, T, dtype=torch.bool, device=self.mask.device)
        if self.mask is None:
            self.mask = torch.ones(B, self.length, dtype=torch.bool, device=new.device)
        self.mask = torch.cat((self.mask, new), dim=1)
        return self.mask

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) of everything cached, in that order (beam search)."""
        for kv in (self.self_kv, self.cross_kv):
            for i, (k, v) in kv.items():
                kv[i] = (k.index_select(0, index), v.index_select(0, index))
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


# --------------------------------------------------------------------------------------------- masks
def padding_mask(mask: Tensor) -> Tensor:
    """(B, L) 1 = real -> (B, 1, 1, L) bool key mask; an all-padding row attends everywhere (no NaN)."""
    keep = mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    return keep | ~keep.any(-1, keepdim=True)


def self_attention_mask(
    causal: bool, T: int, past: int, key_mask: Tensor | None, bias: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The self-attention mask shared by every layer of a stack, and whether to use the causal fast path.

    T new queries attend to L = past + T keys. key_mask (B, L) bool marks real keys, or (B, T, L) the keys each
    query may see (packed rows, `packed_masks`); bias (1, nh, T, L) is the relative position bias. Returns a
    bool mask (True = may attend) broadcastable to (B, nh, T, L), an additive float mask when there is a bias,
    or None.
    """
    if bias is None and key_mask is None:
        if not causal or T == 1:  # encoder without padding, or one new token that may see the whole cache
            return None, False
        if past == 0:
            return None, True
    allowed = None
    if causal and T > 1:
        allowed = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)  # (T, L): i sees <= past+i
    if key_mask is not None:
        keys = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]  # (B, 1, 1|T, L)
        allowed = keys if allowed is None else keys & allowed  # (B, 1, T, L)
    if allowed is None:
        return bias, False
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query with no real key sees all: finite, ignored
    if bias is None:
        return allowed, False
    return torch.where(allowed, bias, float("-inf")), False  # (B|1, nh, T, L)


def position_ids(T: int, past: int, key_mask: Tensor | None, device: torch.device) -> Tensor:
    """Absolute positions of the T new tokens (B|1, T): the count of real tokens before each one."""
    if key_mask is None:
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    m = key_mask.long()  # (B, L)
    return (m.cumsum(1) - m)[:, past:]  # (B, T); a pad takes the position of the next real token


def packed_masks(example_ids: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positions and attention of rows that pack several examples, as HF's `DataCollatorWithFlattening` and
    modded-nanogpt's document masks do: example_ids (B, T) number each row's examples 1, 2, ... in order (0 =
    padding), each example contiguous. Returns (positions (B, T): counted from each example's first token;
    keys (B, T, T) bool: a query sees the real keys of its own example only, `key_mask` (B, T) too if given).
    The relative position bias needs nothing more: within an example, packed distances are true distances."""
    T = example_ids.size(1)
    idx = torch.arange(T, device=example_ids.device)
    first = example_ids != torch.nn.functional.pad(example_ids[:, :-1], (1, 0), value=-1)  # (B, T)
    start = torch.where(first, idx, 0).cummax(1).values  # (B, T) where each token's example starts
    keys = (example_ids[:, :, None] == example_ids[:, None, :]) & (example_ids > 0)[:, None, :]  # (B, T, T)
    if key_mask is not None:
        keys &= key_mask[:, None, :]
    return (idx - start).clamp(max=T - 1), keys


def packed_cross_mask(query_ids: Tensor, key_ids: Tensor) -> Tensor:
    """(B, 1, T, S) bool cross-attention mask of packed encoder-decoder rows: a decoder token (query_ids (B, T),
    `packed_masks` numbering) sees the encoder tokens of its own example only (key_ids (B, S)); a query with none
    (padding) sees all: finite, ignored."""
    allowed = (query_ids[:, :, None] == key_ids[:, None, :]) & (key_ids > 0)[:, None, :]
    return (allowed | ~allowed.any(-1, keepdim=True))[:, None]


def first_tokens(example_ids: Tensor) -> Tensor:
    """(B, E) the position of each packed example's first token (E: the most examples in a row; a row with
    fewer gets its last position there, which the caller ignores)."""
    B, T = example_ids.shape
    E = max(1, int(example_ids.max()))
    pos = torch.arange(T, device=example_ids.device).expand(B, T)
    first = torch.full((B, E + 1), T - 1, dtype=torch.long, device=example_ids.device)
    return first.scatter_reduce(1, example_ids, pos, reduce="amin")[:, 1:]
