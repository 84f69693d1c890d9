"""The Objective protocol, the Batch type, IGNORE_INDEX and the loss helpers every objective shares.

An objective is a frozen dataclass whose fields are its hyper-parameters; constructing it validates them
(raise `pretrain.errors.UserError` from `__post_init__`). It says which model arrangement it needs
(`arch`), draws a corrupted batch from the token cache (`batch`, a pure function of the generator it is
given, vectorized over the whole batch), and turns a batch into per-term *sums* of losses (`loss`).

Loss averaging happens in exactly one place, the trainer: it counts each loss term's targets from the
batch field named in `loss_terms` (entries != IGNORE_INDEX), sums the counts over all micro-batches and
ranks, and divides. So 1x8 and 4x2 gradient accumulation give the same update (HF's per-micro-batch mean
is the bug this avoids).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab

IGNORE_INDEX = -100
"""Label value that marks a position without a target (the value PyTorch's cross_entropy and HF use)."""

Batch = dict[str, torch.Tensor]
"""A batch: HF names. `input_ids`, `attention_mask` (1 = real token), `token_type_ids`, `labels`,
`decoder_input_ids`, `decoder_attention_mask`, `next_sentence_label`. Every tensor is on the CPU when the
objective returns it; the trainer moves it to the device."""

Terms = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""What `Objective.loss` returns: metric name -> (sum, count), both 0-dim tensors. The mean is sum/count.
Loss terms (the keys of `loss_terms`) carry gradients in the sum; every other entry (accuracies, ...) is
detached and reported only."""


@dataclass(frozen=True)
class Arch:
    """The model arrangement an objective needs; the recipe only chooses sizes, so a mismatch cannot be
    configured."""

    kind: Literal["decoder", "encoder", "encoder-decoder"]
    segments: bool = False  # token type (segment) embeddings with 2 types, as BERT
    lm_transform: bool = False  # BERT's MLM head: dense + activation + LayerNorm before the tied output, plus bias
    classifier: int = 0  # > 0: a pooler (dense + tanh on the first token) and a classifier with this many classes


@dataclass(frozen=True)
class Framing:
    """How the objective frames text for its model, so `pretrain generate`/`fill-mask` feed prompts the way
    training did: encoder (or decoder-only) input = prefix + text + suffix; an encoder-decoder's decoder
    starts with `decoder_start`."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    decoder_start: int | None = None


class Objective(Protocol):
    """What every objective provides. See objectives/clm.py for the smallest complete example."""

    name: ClassVar[str]  # the registry key, e.g. "clm"
    arch: ClassVar[Arch]
    loss_terms: ClassVar[dict[str, str]]  # loss term name -> batch field whose non-ignored entries are its targets

    def positions_needed(self, seq_len: int) -> int:
        """The longest sequence (encoder or decoder side) the model sees for `data.seq_len` = seq_len,
        so the trainer can check it against the position table before training starts."""
        ...

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """Draw and corrupt one batch from `split`. Pure given `gen`; vectorized tensor code."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Run the model as this objective needs; return (sum, count) per term (losses in nats)."""
        ...

    def framing(self, vocab: Vocab) -> Framing:
        """The special tokens around a prompt, as in this objective's training batches."""
        ...

    # Optional:
    # default_recipe: ClassVar[str]  -- the CPU-sized recipe `pretrain run --objective NAME` starts from
    # def baseline(self, split, vocab, seq_len) -> dict[str, float]
    #     -- a reference figure the run summary prints beside ours (e.g. a unigram model's loss)


def input_tokens(batch: Batch) -> int:
    """Real (non-pad) input tokens of a batch: the attention mask's sum, or every input_ids entry without one.
    What token budgets, tokens/s and the benchmark count."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def make_generator(seed: int, *stream: int | str) -> torch.Generator:
    """A torch.Generator seeded from (seed, *stream), e.g. (seed, "train", step, micro_step, rank).

    Every batch is a pure function of these numbers, so the data loader keeps no hidden state, resume is
    exact and evaluation uses the same batches in every run.
    """
    key = ":".join(str(s) for s in (seed, *stream)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1))
    return g


def ce_terms(logits: torch.Tensor, labels: torch.Tensor, name: str, label_smoothing: float = 0.0) -> Terms:
    """Summed cross-entropy and accuracy over the labels that are not IGNORE_INDEX.

    logits (..., V) and labels (...) of matching leading shape. Returns {f"{name}_loss": (sum, n),
    f"{name}_acc": (correct, n)}. With label smoothing the loss term is the smoothed loss and
    f"{name}_nll" reports the plain negative log-likelihood (what perplexity and bits per byte use).
    """
    V = logits.size(-1)
    logits = logits.reshape(-1, V).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    n = keep.sum()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & keep).sum()
    out: Terms = {f"{name}_loss": (loss, n), f"{name}_acc": (correct, n)}
    if label_smoothing > 0:
        with torch.no_grad():
            nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        out[f"{name}_nll"] = (nll, n)
    return out


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: labels (B, T) shifted one step right behind `start_id`;
    IGNORE_INDEX entries become `pad_id`."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, pad_id)
