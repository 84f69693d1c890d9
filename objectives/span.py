"""T5 span corruption and prefix LM on the encoder-decoder (Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", JMLR 21(140); the "i.i.d. noise, replace
spans" objective and the prefix-LM baseline), faithful to google-research/text-to-text-transfer-transformer
`t5/data/preprocessors.py` (`span_corruption`, `random_spans_helper`, `random_spans_noise_mask`,
`noise_span_to_unique_sentinel`, `prefix_lm`, `random_prefix_noise_mask`).

Span corruption, for encoder input length L_in = `data.seq_len`:
1. Length accounting (`span_lengths`) is T5's `random_spans_helper` (`random_spans_helper` below, the same
   loop): the largest raw window n with n - noise + spans + 1 <= L_in (noise = round(n * density), spans =
   round(noise / mean_span), half-to-even, +1 for `</s>`); the targets are noise + spans + 1 long. 512 -> n =
   568 (85 noise tokens in 28 spans), targets 114. At density 0.5 the helper takes one raw token fewer
   whenever the targets would come out longer than the inputs (its "minor hack" so both are the same
   length), which can leave the inputs one token short of L_in: we then emit the shorter inputs (T5 pads
   them). The helper counts round(noise / mean_span) spans where the mask (`random_spans_noise_mask`) makes at
   least one; where that rounds to 0 (UL2's mean span 64 at 15% of a 128-token window) the helper's window
   would overflow the inputs by one token (T5's trim then cuts the final `</s>`), so we take the largest
   window that fits with the mask's own counts.
2. Windows of n tokens from the document stream joined with *no separator*, as T5's
   `reduce_concat_tokens` does (`t5/data/preprocessors.py`; the C4 task in `t5/data/tasks.py` runs it before
   `split_tokens`). We keep that: a window may cross a document boundary
   unmarked, exactly as in T5's C4 pipeline.
3. Noise mask: noise and non-noise tokens are each split into `spans` positive parts by a uniform random
   composition (not Poisson) and interleaved non-noise, noise, ..., so the mask starts with non-noise and
   ends with noise (T5's default, `random_roll=False`).
4. Inputs: each noise span becomes one sentinel <extra_id_k>, k = 0, 1, ... in order; targets: each
   span's sentinel followed by the span, no trailing sentinel; `</s>` appended to both after noising. The
   decoder input is the targets shifted right behind <pad> (T5's start token). The loss covers every
   target token, sentinels and `</s>` included.
Every row of a batch has the same n, hence the same noise and span counts: inputs are (B, n - noise + spans
+ 1), which is L_in but for the cases above, and targets (B, noise + spans + 1), with no padding, which keeps
everything fixed-shape tensor code.

Deliberate deviations: window starts are uniform random positions in the stream (T5 cuts consecutive
chunks of a shuffled stream); our sentinel ids count up from 7 (`<extra_id_k>` = 7 + k, our tokenizer's
fixed ids) where T5's count down from V - 1 — the same pieces, other numbers; at most 100 sentinels, so
a seq_len that needs more spans is an error rather than a silent reuse of vocabulary ids.

Prefix LM (T5's `prefix_lm`): a window of n = seq_len - 1 tokens (room for `</s>`, as
`split_tokens_to_inputs_length`), split at a uniform point k in [1, n - 1]; the encoder reads the first k
tokens + `</s>` (right-padded to seq_len), the decoder predicts the other n - k tokens + `</s>`. Deviation:
T5 takes segments inside one document (shorter at document ends); we take fixed-length windows of the
same separator-free stream as span corruption, so shapes stay fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from models.config import Arch
from objectives.base import IGNORE_INDEX, Batch, Framing, Objective, Terms, lm_terms, shift_right
from pretrain.errors import UserError
from pretrain.tokenizer import N_SENTINELS

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


def span_counts(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(num_noise, num_spans) for a raw window of n tokens, as T5's `random_spans_noise_mask`:
    num_noise = clamp(round(n * density), 1, n - 1), num_spans = max(1, round(num_noise / mean_span)),
    Python's round (half to even, like tf.round)."""
    num_noise = min(max(round(n * noise_density), 1), n - 1)
    num_spans = max(1, round(num_noise / mean_span))
    return num_noise, num_spans


def random_spans_helper(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5's `random_spans_helper` (google-research/text-to-text-transfer-transformer `t5/data/preprocessors.py`)
    with one sentinel per span in the inputs and the targets: (tokens_length, targets_length), the raw window
    whose corrupted inputs fill `inputs_length` and the targets' length, `</s>` included. The same loop and the
    same special case at density 0.5, counts rounded half to even without the mask's clamps."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_span))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_len, targets_len = lengths(tokens_length)
    if noise_density == 0.5 and targets_len > inputs_len:  # T5: "get the targets length to be equal to inputs length"
        tokens_length -= 1
        targets_len -= 1
    return tokens_length, targets_len


@lru_cache(maxsize=64)
def span_lengths(seq_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(n, targets_len): the raw window and the target length for encoder inputs of seq_len, as T5's
    `random_spans_helper` gives them; the window shrinks only where the mask's own counts (at least one span)
    would overflow seq_len, and targets_len is never below the real target length (module docstring).
    512 -> (568, 114); 128 -> (141, 29); 256 -> (284, 58); 1024 -> (1137, 229).
    """
    if seq_len < 3:
        raise UserError(f"data.seq_len must be >= 3 for span corruption, got {seq_len}")
    n, targets_len = random_spans_helper(seq_len, noise_density, mean_span)
    noise, spans = span_counts(n, noise_density, mean_span)
    while n > 2 and n - noise + spans + 1 > seq_len:  # only where round(noise / mean_span) is 0 (one span is made)
        n -= 1
        noise, spans = span_counts(n, noise_density, mean_span)
    if n - noise < spans:
        raise UserError(
            f"noise_density {noise_density} with mean_span {mean_span} leaves {n - noise} non-noise tokens for "
            f"{spans} spans; lower objective.noise_density or raise objective.mean_span"
        )
    if spans > N_SENTINELS:
        raise UserError(
            f"data.seq_len {seq_len} needs {spans} noise spans but the tokenizer has {N_SENTINELS} sentinels; "
            "lower data.seq_len or raise objective.mean_span"
        )
    return n, max(targets_len, noise + spans + 1)


def random_compositions(batch_size: int, total: int, parts: int, gen: torch.Generator) -> torch.Tensor:
    """(B, parts) int64: per row, a uniform random composition of `total` into `parts` positive parts
    (T5's `_random_segmentation`): the parts - 1 cut points are a uniform random subset of {1..total-1},
    taken as the top parts - 1 of iid uniform scores."""
    if parts == 1:
        return torch.full((batch_size, 1), total, dtype=torch.long)
    scores = torch.rand(batch_size, total - 1, generator=gen)  # (B, total-1): one per possible cut
    cuts = scores.topk(parts - 1, dim=1, sorted=False).indices.sort(dim=1).values + 1  # (B, parts-1)
    edges = torch.cat(
        [cuts.new_zeros(batch_size, 1), cuts, cuts.new_full((batch_size, 1), total)], dim=1
    )  # (B, parts+1)
    return edges.diff(dim=1)


def noise_segments(batch_size: int, n: int, num_noise: int, num_spans: int, gen: torch.Generator) -> torch.Tensor:
    """(B, n) int64 segment id of every position: 0, 2, 4, ... are the non-noise spans and 1, 3, 5, ... the
    noise spans, in order, so `seg % 2 == 1` is T5's noise mask (starts non-noise, ends noise) and
    `seg // 2` is the span's sentinel number."""
    noise_len = random_compositions(batch_size, num_noise, num_spans, gen)  # (B, S)
    keep_len = random_compositions(batch_size, n - num_noise, num_spans, gen)  # (B, S)
    lengths = torch.stack([keep_len, noise_len], dim=2).view(-1)  # (B*2S,) interleaved non-noise, noise
    ids = torch.arange(2 * num_spans).repeat(batch_size)  # (B*2S,)
    return torch.repeat_interleave(ids, lengths, output_size=batch_size * n).view(batch_size, n)


def stream_windows(split: TokenSplit, batch_size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, length) int64 windows at uniform random starts of the documents joined with no separator
    (T5's `reduce_concat_tokens`); ids are taken as they are in the cache, none is filtered."""
    if split.n_tokens < length:
        raise UserError(
            f"a split has {split.n_tokens} tokens, fewer than the {length} one window needs; "
            "lower data.seq_len or use more text"
        )
    starts = torch.randint(0, split.n_tokens - length + 1, (batch_size,), generator=gen)
    idx = starts.numpy()[:, None] + np.arange(length)  # (B, length)
    return torch.from_numpy(np.asarray(split.tokens[idx], dtype=np.int64))


def _unigram_entropy(split: TokenSplit, vocab: Vocab) -> float:
    """Entropy in nats of the split's token unigram distribution (the stream has no separators)."""
    counts = split.unigram_counts(vocab.size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class SpanCorruption(Objective):
    """T5's span corruption: noise spans replaced by sentinels in the encoder input; the decoder writes
    each sentinel followed by the span it hides."""

    noise_density: float = 0.15  # fraction of the raw window's tokens that are noise (hidden and predicted)
    mean_span: float = 3.0  # mean noise span length in tokens (spans = round(noise / mean_span))

    name: ClassVar[str] = "span"
    arch: ClassVar[Arch] = Arch(kind="encoder-decoder")
    loss_terms: ClassVar[dict[str, str]] = {"span_loss": "labels"}
    default_recipe: ClassVar[str] = "t5-tiny"

    def framing(self, vocab: Vocab) -> Framing:
        """T5: encoder input `text </s>`; the decoder starts with `<pad>`."""
        return Framing((), (vocab.eos,), vocab.pad)

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise UserError(f"objective.noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span >= 1.0:
            raise UserError(f"objective.mean_span must be >= 1, got {self.mean_span}")

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(raw window length n, target length) for encoder input length seq_len."""
        return span_lengths(seq_len, self.noise_density, self.mean_span)

    def positions_needed(self, seq_len: int) -> int:
        """The encoder reads seq_len tokens, the decoder noise + spans + 1 (fewer)."""
        return max(seq_len, self.lengths(seq_len)[1])

    def decoder_length(self, seq_len: int) -> int:
        """Targets are noise + spans + 1 tokens (114 for 512 inputs)."""
        return self.lengths(seq_len)[1]

    def raw_window(self, seq_len: int) -> int:
        """The raw window the inputs are cut from (568 for 512 inputs)."""
        return self.lengths(seq_len)[0]

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """Each span's sentinel and the final `</s>` are predicted, as in T5."""
        return frozenset({vocab.sentinel(k) for k in range(N_SENTINELS)} | {vocab.eos})

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """batch_size raw windows of n tokens, corrupted: input_ids (B, n - noise + spans + 1) (seq_len, or one
        less under T5's 50% rule), labels and decoder_input_ids (B, noise + spans + 1); no padding anywhere."""
        n, _ = self.lengths(seq_len)
        num_noise, num_spans = span_counts(n, self.noise_density, self.mean_span)
        B = batch_size
        w = stream_windows(split, B, n, gen)  # (B, n)
        seg = noise_segments(B, n, num_noise, num_spans, gen)  # (B, n)
        noise = (seg & 1).bool()  # (B, n)
        first = torch.ones_like(noise)  # (B, n): first position of each span (noise or not)
        first[:, 1:] = seg[:, 1:] != seg[:, :-1]
        sentinel = vocab.sentinel(0) + (seg >> 1)  # (B, n): the sentinel of the span pair each position is in
        # Inputs keep non-noise tokens and put the sentinel on the first token of each noise span; targets
        # are the mirror image: noise tokens kept, each non-noise span reduced to its sentinel.
        inp = torch.where(noise, sentinel, w).masked_select(~noise | first).view(B, n - num_noise + num_spans)
        tgt = torch.where(noise, w, sentinel).masked_select(noise | first).view(B, num_noise + num_spans)
        eos = w.new_full((B, 1), vocab.eos)
        input_ids = torch.cat([inp, eos], dim=1)  # (B, n - noise + spans + 1): seq_len but for T5's 50% rule
        labels = torch.cat([tgt, eos], dim=1)  # (B, noise + spans + 1) <= the helper's targets length
        assert input_ids.size(1) <= seq_len
        return {
            "input_ids": input_ids,
            "labels": labels,
            "decoder_input_ids": shift_right(labels, vocab.pad, vocab.pad),
        }

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Summed cross-entropy over every target token (sentinels and `</s>` included) and accuracy."""
        return model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            decoder_input_ids=batch["decoder_input_ids"],
            project=lm_terms(batch["labels"], "span", label_smoothing),  # (B, T_tgt) targets
        ).logits

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Loss in nats per target token of the best unigram model of the *target* stream: a fraction
        noise/T of target tokens are corpus tokens (unigram-distributed), the other spans + 1 are the
        sentinels 0..spans-1 and `</s>`, once each (T = noise + spans + 1). Its entropy is
        (noise/T) (H(corpus) - log(noise/T)) + ((spans + 1)/T) log T."""
        n, T = self.lengths(seq_len)
        num_noise, _ = span_counts(n, self.noise_density, self.mean_span)
        f = num_noise / T
        loss = f * (_unigram_entropy(split, vocab) - math.log(f)) + (1 - f) * math.log(T)
        return {"unigram_target_loss": loss}


@dataclass(frozen=True)
class PrefixLM(Objective):
    """T5's prefix LM baseline: the encoder reads a random-length prefix of the window, the decoder
    predicts the rest.

    One window a row pads half of both stacks' positions on average (the encoder to its longest prefix, the
    decoder to its longest rest). `pack = true` puts two windows of seq_len - 2 tokens in a row, the first split
    at k ~ U[1, m - 1] and the second at m - k, so that both rows are exactly full: every example's split is
    still uniform, but the two of a row are antithetic (k and m - k), the deliberate deviation."""

    pack: bool = False  # two windows a row, split at k and m - k: no padding in either stack

    name: ClassVar[str] = "prefix"
    arch: ClassVar[Arch] = Arch(kind="encoder-decoder")
    loss_terms: ClassVar[dict[str, str]] = {"prefix_loss": "labels"}
    default_recipe: ClassVar[str] = "t5-tiny"

    def framing(self, vocab: Vocab) -> Framing:
        """T5: encoder input `text </s>`; the decoder starts with `<pad>`."""
        return Framing((), (vocab.eos,), vocab.pad)

    # Encoder inputs are at most seq_len long (prefix + `</s>`), targets at most seq_len - 1: the default
    # `positions_needed` fits.

    @property
    def packs_examples(self) -> bool:
        """Packed, a row holds two windows (no per-example field, but a mixture packs all components or none)."""
        return self.pack

    def decoder_length(self, seq_len: int) -> int:
        """Decoder rows are seq_len - 1 slots (the rest of the window and `</s>`, then padding); packed, seq_len
        (two rests and their `</s>`)."""
        return seq_len if self.pack else seq_len - 1

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """The target ends with `</s>`."""
        return frozenset({vocab.eos})

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """Windows of n = seq_len - 1 tokens split at k ~ U[1, n-1]: input_ids and attention_mask
        (B, seq_len) = prefix + `</s>` then <pad>; labels (B, n) = rest + `</s>` then IGNORE_INDEX."""
        n = seq_len - 1
        if n < 2:
            raise UserError(f"data.seq_len must be >= 3 for the prefix LM, got {seq_len}")
        if self.pack:
            return self._packed(split, vocab, gen, batch_size, seq_len)
        B = batch_size
        w = stream_windows(split, B, n, gen)  # (B, n)
        k = torch.randint(1, n, (B, 1), generator=gen)  # (B, 1): prefix length, uniform on [1, n-1]
        w_eos = torch.cat([w, w.new_full((B, 1), vocab.eos)], dim=1)  # (B, n+1): the window then </s>
        pos = torch.arange(seq_len)  # (seq_len,)
        attention_mask = pos <= k  # (B, seq_len): prefix and its </s>
        input_ids = torch.where(pos < k, w_eos, vocab.eos).masked_fill(~attention_mask, vocab.pad)
        src = k + pos[:n]  # (B, n): window position each target slot copies; n is the </s>
        labels = w_eos.gather(1, src.clamp(max=n)).masked_fill(src > n, IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask.long(),
            "labels": labels,
            "decoder_input_ids": shift_right(labels, vocab.pad, vocab.pad),
        }

    def _packed(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, seq_len: int) -> Batch:
        """Two windows of m = seq_len - 2 tokens a row, split at k and m - k (the class docstring): input_ids (B,
        seq_len) = prefix 1 `</s>` prefix 2 `</s>`, labels (B, seq_len) = rest 1 `</s>` rest 2 `</s>`, every slot
        real; example_ids / decoder_example_ids number the two, and each decoder starts at `<pad>`."""
        m = seq_len - 2
        if m < 2:
            raise UserError(f"data.seq_len must be >= 4 for the packed prefix LM, got {seq_len}")
        w = stream_windows(split, 2 * B, m, gen)  # (2B, m): row r packs windows r and B + r
        w0, w1 = w[:B], w[B:]
        k = torch.randint(1, m, (B, 1), generator=gen)  # the first window's prefix; the second's is m - k
        pos = torch.arange(seq_len).expand(B, seq_len)
        second = pos > k  # encoder: w0[:k] `</s>` at k, then w1[:m - k] and `</s>` last
        enc = torch.where(second, w1.gather(1, (pos - k - 1).clamp(0, m - 1)), w0.gather(1, pos.clamp(max=m - 1)))
        ends = torch.cat([k, pos[:, -1:]], 1)  # (B, 2) each example's `</s>`
        input_ids = enc.scatter_(1, ends, vocab.eos)
        dec_second = pos > m - k  # decoder: w0[k:] `</s>` at m - k, then w1[m - k:] (slot p reads w1[p - 1])
        dec = torch.where(dec_second, w1.gather(1, (pos - 1).clamp(0, m - 1)), w0.gather(1, (k + pos).clamp(max=m - 1)))
        labels = dec.scatter_(1, torch.cat([m - k, pos[:, -1:]], 1), vocab.eos)
        decoder_input_ids = shift_right(labels, vocab.pad, vocab.pad).scatter_(1, m - k + 1, vocab.pad)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "decoder_input_ids": decoder_input_ids, "example_ids": 1 + second.long(),
                "decoder_example_ids": 1 + dec_second.long()}

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Summed cross-entropy over the real target tokens; the vocabulary projection runs only where
        there is a target (half the decoder slots are padding on average, none when packed)."""
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX  # (B, T_tgt)
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            output_mask=keep,
            project=lm_terms(labels[keep], "prefix", label_smoothing),  # the rows of keep, row-major
            example_ids=batch.get("example_ids"),
            decoder_example_ids=batch.get("decoder_example_ids"),
        ).logits

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Loss in nats per target token of the best unigram model of the targets: corpus tokens plus one
        `</s>` per sequence; with k ~ U[1, n-1] a target holds n/2 + 1 tokens on average (n = seq_len - 1, or
        seq_len - 2 packed)."""
        n = seq_len - 2 if self.pack else seq_len - 1
        f = 1.0 / (n / 2 + 1)  # fraction of target tokens that are </s>
        loss = (1 - f) * (_unigram_entropy(split, vocab) - math.log(1 - f)) - f * math.log(f)
        return {"unigram_target_loss": loss}
