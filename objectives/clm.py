"""Causal language modelling (Radford et al. 2018, 2019; nanoGPT).

Documents are joined into one stream with `</s>` after each document (nanoGPT
`data/openwebtext/prepare.py` appends GPT-2's end-of-text token to every document); a window of T+1
consecutive stream tokens gives inputs = the first T and labels = the last T (nanoGPT `train.py`,
`get_batch`), so one forward pass under the causal mask scores every position (teacher forcing). As GPT-2
and nanoGPT do (`model.py`, `CausalSelfAttention.forward` with `is_causal=True` over the whole window),
attention crosses document boundaries inside a window: the `</s>` tells the model a new document starts.
Block-diagonal masking was measured to buy about 0.1% for a large speed cost
(https://github.com/mlfoundations/open_lm/issues/206), so by default we do not mask; `doc_attention = true`
does (as modded-nanogpt's document masks and HF's `DataCollatorWithFlattening` do): each `</s>` starts the
next document, which attends only to itself, with positions counted from its `</s>`, so every document reads
as if it began a window (the way `pretrain generate` frames a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from models.config import Arch
from objectives.base import Batch, Objective, Terms, lm_terms

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


def stream_windows(split: TokenSplit, starts: torch.Tensor, length: int, sep: int) -> torch.Tensor:
    """Windows of the document stream with `sep` after every document, gathered without a Python loop.

    In the virtual stream document d occupies [doc_offsets[d] + d, doc_offsets[d+1] + d) and its
    separator sits at doc_offsets[d+1] + d. starts (B,) are virtual positions; returns (B, length) int64. A window
    may run past the stream's end (RoBERTa's blocks cut theirs short): what it holds there is unspecified.
    Only each window's first and last positions are looked up among the documents; the separators between
    them are marked from the documents' ends, and a running count of them gives every position's document d,
    hence its real position v - d (a separator counts with the next document, so it reads its own document's
    last token, which `sep` then replaces).
    """
    vstart, offsets = split.stream_starts, split.doc_offsets  # (D,) virtual start of each document
    v0 = starts.numpy()
    d0 = np.searchsorted(vstart, v0, side="right") - 1  # (B,) document of each window's first position
    d1 = np.searchsorted(vstart, v0 + length - 1, side="right") - 1  # (B,) and of its last
    B, K = len(v0), int((d1 - d0).max(initial=0)) + 1  # documents a window touches, at most
    dd = d0[:, None] + np.arange(K)  # (B, K) those documents
    last = np.minimum(dd, len(vstart) - 1)
    rel = np.where(dd <= d1[:, None], offsets[last + 1] + last - v0[:, None], length)  # (B, K) their separators
    rel = np.minimum(rel, length)  # columns in the window; `length`: past it
    mark = np.zeros((B, length + 1), np.int32)
    mark[np.arange(B)[:, None], rel] = 1  # separators (a window holds each at most once)
    is_sep = torch.from_numpy(mark[:, :length].astype(bool))
    d = torch.from_numpy(d0)[:, None] + torch.from_numpy(mark[:, :length]).cumsum(1)  # (B, L) (next one on a sep)
    real = (starts[:, None] + torch.arange(length) - d).numpy()  # position in the real token array
    ids = torch.from_numpy(split.tokens[np.minimum(real, split.n_tokens - 1)].astype(np.int64))  # past the end: any
    return ids.masked_fill_(is_sep, sep)


@dataclass(frozen=True)
class CausalLM(Objective):
    """Next-token prediction on every position of a window of the `</s>`-joined document stream."""

    doc_attention: bool = False  # attend only within each document (GPT-2 and nanoGPT attend across documents)

    name: ClassVar[str] = "clm"
    arch: ClassVar[Arch] = Arch(kind="decoder")
    loss_terms: ClassVar[dict[str, str]] = {"lm_loss": "labels"}
    default_recipe: ClassVar[str] = "gpt2-tiny"  # the CPU-sized recipe `pretrain run --objective clm` starts from
    scores_whole_text: ClassVar[bool] = True  # every token of the stream is a target: bits per byte compare
    # The defaults fit: inputs are seq_len tokens long, and a prompt follows the `</s>` that ends the previous
    # document (Objective.positions_needed, Objective.framing).

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """The `</s>` after each document is predicted like any token."""
        return frozenset({vocab.eos})

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """batch_size windows of seq_len + 1 stream tokens at uniform random starts."""
        stream_len = split.n_tokens + split.n_docs
        span = stream_len - (seq_len + 1)
        if span < 0:
            raise ValueError(f"split has {stream_len} stream tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, span + 1, (batch_size,), generator=gen)
        w = stream_windows(split, starts, seq_len + 1, vocab.eos)  # (B, T+1)
        out = {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}
        if self.doc_attention:  # each </s> opens the next document's example: 1, 2, ... along the row
            out["example_ids"] = 1 + (out["input_ids"] == vocab.eos).long().cumsum(1)
        return out

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Summed next-token cross-entropy over all B*T positions."""
        return model(batch["input_ids"], example_ids=batch.get("example_ids"),
                     project=lm_terms(batch["labels"], "lm", label_smoothing)).logits

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Bits per byte of a unigram model fit and scored on `split` (the trainer passes the training split):
        the figure any language model must beat."""
        counts = split.unigram_counts(vocab.size).astype(np.float64)
        counts[vocab.eos] += split.n_docs
        p = counts[counts > 0] / counts.sum()
        nats = -(counts[counts > 0] * np.log(p)).sum()
        if split.n_bytes <= 0:
            return {}
        return {"unigram_bits_per_byte": float(nats / (np.log(2) * split.n_bytes))}
