"""BART's denoising objective on the encoder-decoder (Lewis et al. 2019, "BART: Denoising Sequence-to-Sequence
Pre-training for Natural Language Generation, Translation, and Comprehension", arXiv:1910.13461; the final
model: text infilling with Poisson(3) spans over 30% of the text, plus permutation of every sentence),
faithful to fairseq's `fairseq/data/denoising_dataset.py` (`DenoisingDataset`) where the paper is silent.

Blocks. A block starts at a uniformly random sentence of the cache and takes whole consecutive sentences
while they fit in seq_len - 2 tokens (a single over-long sentence is cut to seq_len - 2), framed as
`<s> ... </s>` and right-padded. With `cross_documents` (the default) a block may run on into the next
document with no separator, which is fairseq's `--sample-break-mode complete` (its `DenoisingDataset`
strips every `</s>` before blocking, so documents are never marked inside a block); we pack because short
documents (the built-in corpus is docstrings) would otherwise leave most of each block as padding.
`cross_documents = false` stops at the document end: fairseq's task default, `complete_doc`.
`pack = true` puts several blocks in a row instead of one (objectives/sentences.py): each keeps its own
attention (encoder, decoder and cross-attention stay within the block), positions and noise, so it trains what
it would alone. The blocks are drawn as above and placed first-fit; a row with 8 or more tokens of room left
then takes one more block drawn for that room. Such tail blocks, often one cut sentence, are the deliberate
deviation: they fill the rows (97% of the decoder's positions on the built-in corpus, against 88% one block a
row, at seq_len 128) at the price of blocks shorter than BART's. Each block gets the same noise at the same
rates (30% of its own words, rounded, are masked); a tail block of one sentence has nothing to permute.
The target (`labels`) is the clean block, every token of it (`<s>` and `</s>` included, pads ignored);
`decoder_input_ids` is it shifted right behind `</s>`, the decoder start token of fairseq (which moves
`</s>` to the front) and HF (`decoder_start_token_id` = 2 = `</s>` in BART's vocabulary).

Noise, in fairseq's order: permute sentences -> mask (infilling, plus the optional token deletion and
single-token masking) -> insert -> rotate; then a `random_ratio` fraction of all [MASK]s become a random
ordinary token (never a special piece; fairseq draws from [1, V), specials included).
- Sentence permutation: ceil(k * permute_ratio) of the block's k sentences, chosen at random, are shuffled
  among their own slots (all of them at 1.0); `<s>`/`</s>` stay put. Boundaries are the cache's sentence
  offsets, so permutation works with any tokenizer (fairseq's `permute_sentences` splits at a full-stop token).
- Text infilling works on whole words, as BART's `--mask-length span-poisson` does (fairseq's
  `mask_whole_words`): a word is a piece with sentencepiece's boundary mark ("▁", `vocab.word_start`) and
  the pieces after it; the first piece of each sentence also starts a word, so a word never straddles a
  sentence. The budget is M = floor(mask_ratio * W + 1/2) of the block's W words (fairseq: ceil).
  Span lengths, in words, are Poisson(lambda) draws until they sum to M, the last one cut so the sum is
  exactly M (zero-length draws stay: each inserts a [MASK]); the cut span trades places with a random one,
  as fairseq puts its cut span at a random start. The spans are then laid out left to right in that order
  with the W - M unmasked words as gaps: at least one unmasked word between two spans (so spans never
  overlap or touch), the remaining F unmasked words split among the m + 1 gaps by the spacings of m sorted
  uniform draws on [0, F] (exchangeable gaps; T5's composition does the same job). Each span becomes ONE
  [MASK] (fairseq's `--replace-length 1`). So exactly M words are masked in every block, spans start at word
  starts and end at word ends, and never touch `<s>`/`</s>`. fairseq instead draws span starts among
  word starts without replacement but lets spans overlap: it covers ~27% when asked for 30% (measured).
  The *token* fraction is M/W words' worth of tokens: 0.30 in expectation, exact when every piece starts a
  word. (If the unmasked words cannot separate the spans, only at mask ratios near 1, spans may touch.)
- Off by default, as in the final BART: `delete_ratio` / `token_mask_ratio` delete / replace by [MASK]
  each remaining token independently with that probability (the paper's token deletion and token masking);
  `insert_ratio` inserts round(insert_ratio * n) random ordinary tokens at uniform gaps (fairseq inserts
  [MASK]s, a `random_ratio` share of them random: the issue asks for random-token insertion);
  `rotate_ratio` is the probability a block is rotated to start at a uniformly random token, `<s>`/`</s>`
  kept in place.

Everything is array code over the whole batch (torch, and numpy for the small per-span arrays): the only loops
are over a few numbers of rounds (drawing more Poisson lengths in the rare batch where the first draw falls short
of a budget).
Every step works block by block within the rows (one block a row is the case of one), so packed rows need no
code of their own. The source is padded per batch to its longest row with an `attention_mask`; it is cut to
`positions_needed(seq_len)` (keeping `</s>`) in the pathological case where zero-length spans make it
longer, which needs a mask ratio near 0 on a full row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from models.config import Arch
from objectives.base import IGNORE_INDEX, Batch, Framing, Objective, Terms, lm_terms
from objectives.sentences import Blocks, block_spans, one_per_row, packed, permute_sentences
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


@lru_cache(maxsize=16)
def poisson_cdf(lam: float) -> np.ndarray:
    """(K,) float64 cumulative distribution of Poisson(lam) up to where the tail is below 1e-12; a uniform
    u maps to the draw searchsorted(cdf, u, side="right") (inverse-CDF sampling: exact up to that tail)."""
    k_max = int(lam + 12 * math.sqrt(lam) + 30)
    k = torch.arange(k_max + 1, dtype=torch.float64)
    log_pmf = k * math.log(lam) - lam - torch.lgamma(k + 1)
    cdf = log_pmf.exp().cumsum(0)
    return cdf[: int((cdf < 1 - 1e-12).sum()) + 1].clamp(max=1.0).numpy()


# The span draws below work on (blocks, spans) arrays of a few thousand numbers, where numpy's per-call cost is a
# fraction of torch's; their uniforms still come from the batch's torch generator. Products of a float32 uniform
# and a count are taken in float32, as torch would.

def poisson_spans(budget: torch.Tensor | np.ndarray, lam: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span lengths for each row: Poisson(lam) draws until they sum to budget (B,), the last cut to fit and
    then swapped with a uniformly random span. Returns (lengths (B, S) int64, zero past each row's spans;
    m (B,) number of spans, 0 where the budget is 0; cut (B,) index of the cut span, the one not a whole draw)."""
    cdf = poisson_cdf(lam)
    budget = np.asarray(budget, dtype=np.int64)
    B = len(budget)
    top = int(budget.max()) if B else 0
    S = int(top / max(lam, 1e-3) + 4 * math.sqrt(top / max(lam, 1e-3)) + 4)  # almost always enough draws

    def draw() -> np.ndarray:
        u = torch.rand(B, S, generator=gen, dtype=torch.float64).numpy()
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)

    lengths = draw()
    cum = lengths.cumsum(1)
    while bool((cum[:, -1] < budget).any()):  # rare: a row's draws fell short; draw another round
        lengths = np.concatenate([lengths, draw()], 1)
        cum = lengths.cumsum(1)
    S = lengths.shape[1]
    m = np.where(budget > 0, (cum < budget[:, None]).sum(1) + 1, 0)  # (B,) first index reaching the budget, +1
    r = np.arange(S)
    lengths = np.where(r == (m - 1)[:, None], budget[:, None] - (cum - lengths), lengths)
    lengths[r >= m[:, None]] = 0
    # The cut span takes a uniformly random place among the row's spans (its lengths are otherwise i.i.d.).
    u = torch.rand(B, generator=gen).numpy()
    i = np.maximum(m - 1, 0)
    j = np.minimum((u * m.astype(np.float32)).astype(np.int64), i)  # (B,)
    rows = np.arange(B)
    lengths[rows, j], lengths[rows, i] = lengths[rows, i], lengths[rows, j]
    return torch.from_numpy(lengths), torch.from_numpy(m), torch.from_numpy(j)


def place_spans(n_words: np.ndarray, lengths: np.ndarray, m: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """First word (B, S) of each span, laid out left to right with the unmasked words as gaps (see the
    module docstring): at least one unmasked word between consecutive spans when there are enough, the rest
    split by the spacings of sorted uniform draws. Entries past a row's m spans are meaningless."""
    B, S = lengths.shape
    r = np.arange(S)
    kept = n_words - lengths.sum(1)  # (B,) unmasked words
    sep = (kept >= m - 1).astype(np.int64)  # (B,) 1 = keep one unmasked word between consecutive spans
    free = kept - sep * np.maximum(m - 1, 0)  # (B,) unmasked words left to distribute over the m + 1 gaps
    u = torch.rand(B, S, generator=gen).numpy()
    u[r >= m[:, None]] = 2.0
    u.sort(1)
    c = np.minimum((u * (free + 1).astype(np.float32)[:, None]).astype(np.int64), free[:, None])  # free words before r
    return c + (lengths.cumsum(1) - lengths) + sep[:, None] * r


def _emit(value: torch.Tensor, keep: torch.Tensor, n_ins: torch.Tensor, n_rand: torch.Tensor | None, vocab: Vocab,
          gen: torch.Generator, blocks: Blocks | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Write each row's source: every position emits its inserted tokens (n_rand random ones first, then n_ins
    [MASK]s), then its own `value` where `keep`. value, keep, n_ins, n_rand (B, T). Returns (out (B, S), total
    (B,), out_ex): the sources left-aligned (slots past `total` hold [MASK]), their lengths, and given the rows'
    `blocks` (packed rows) the block of each source slot, 0 past `total`."""
    B = value.size(0)
    n_before = n_ins if n_rand is None else n_ins + n_rand
    kept = keep.long()
    ends = (n_before + kept).cumsum(1)
    out_pos = ends - kept  # (B, T) output slot of the token itself (when kept), after its insertions
    total = ends[:, -1]  # (B,) source lengths
    S = int(total.max())
    out = torch.full((B, S + 1), vocab.mask, dtype=torch.long)  # unwritten slots are inserted [MASK]s
    out.scatter_(1, torch.where(keep, out_pos, S), value)
    if n_rand is not None:
        # Mark each run of random insertions with +1 at its first slot and -1 past its last.
        first = out_pos - n_before  # (B, T) first output slot of each position's insertions
        runs = torch.zeros(B, S + 2, dtype=torch.long)
        has = n_rand > 0
        runs.scatter_add_(1, torch.where(has, first, S + 1), has.long())
        runs.scatter_add_(1, torch.where(has, first + n_rand, S + 1), -has.long())
        is_rand = runs.cumsum(1)[:, : S + 1] > 0
        n_draw = int(is_rand.sum())
        draws = vocab.ordinary_ids[torch.randint(len(vocab.ordinary_ids), (n_draw,), generator=gen)]
        out = out.masked_scatter(is_rand, draws)
    out_ex = None
    if blocks is not None:  # each block's `<s>`, never preceded by insertions, opens its block's slots
        at = torch.where(blocks.n > 0, out_pos.gather(1, blocks.first), S)  # (B, E)
        opens = torch.zeros(B, S + 1, dtype=torch.long).scatter_(1, at, 1)
        out_ex = opens.cumsum(1)[:, :S].masked_fill_(torch.arange(S) >= total[:, None], 0)
    return out[:, :S], total, out_ex


@dataclass(frozen=True)
class Denoising(Objective):
    """BART's denoising autoencoder: the encoder reads a corrupted block, the decoder rewrites it clean."""

    mask_ratio: float = 0.3  # fraction of each block's words hidden by text infilling (0 = no infilling)
    poisson_lambda: float = 3.0  # mean of the Poisson distribution of infilling span lengths, in words
    random_ratio: float = 0.1  # fraction of [MASK]s that become a random ordinary token (fairseq --mask-random)
    permute_ratio: float = 1.0  # fraction of each block's sentences shuffled among themselves
    delete_ratio: float = 0.0  # probability each remaining token is deleted (paper's token deletion)
    token_mask_ratio: float = 0.0  # probability each remaining token becomes [MASK] alone (paper's token masking)
    rotate_ratio: float = 0.0  # probability a block is rotated to start at a random token (document rotation)
    insert_ratio: float = 0.0  # random ordinary tokens inserted, as a fraction of the block's tokens
    cross_documents: bool = True  # a block may continue into the next document (fairseq "complete" mode)
    pack: bool = False  # several blocks share a row, attention within each (objectives/sentences.py, packing.py)

    name: ClassVar[str] = "denoise"
    arch: ClassVar[Arch] = Arch(kind="encoder-decoder")
    loss_terms: ClassVar[dict[str, str]] = {"denoise_loss": "labels"}
    default_recipe: ClassVar[str] = "bart-tiny"  # recipe used by `pretrain run --objective denoise` alone

    def framing(self, vocab: Vocab) -> Framing:
        """BART: encoder input `<s> text </s>`; the decoder starts with `</s>` (fairseq/HF convention)."""
        return Framing((vocab.bos,), (vocab.eos,), vocab.eos)

    def __post_init__(self) -> None:
        for key in ("mask_ratio", "random_ratio", "permute_ratio", "delete_ratio", "token_mask_ratio",
                    "rotate_ratio", "insert_ratio"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"objective.{key} must be in [0, 1], got {v}")
        if not 0.1 <= self.poisson_lambda <= 100.0:
            raise UserError(f"objective.poisson_lambda must be in [0.1, 100], got {self.poisson_lambda}")
        if self.delete_ratio + self.token_mask_ratio > 1.0:
            raise UserError("objective.delete_ratio + objective.token_mask_ratio must be <= 1, got "
                            f"{self.delete_ratio} + {self.token_mask_ratio}")

    @property
    def packs_examples(self) -> bool:
        """Packed rows hold several blocks (no per-example field, but a mixture packs all components or none)."""
        return self.pack

    def positions_needed(self, seq_len: int) -> int:
        """The decoder reads seq_len tokens; the source is at most that plus the random insertions."""
        return seq_len + math.ceil(self.insert_ratio * (seq_len - 2))

    def special_targets(self, vocab: Vocab) -> frozenset[int]:
        """The target is the clean block, `<s>` and `</s>` included (fairseq's target)."""
        return frozenset({vocab.bos, vocab.eos})

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """batch_size rows of blocks of whole sentences, corrupted. input_ids/attention_mask (B, S) padded to the
        longest source; labels (B, T) the clean blocks with pads -> IGNORE_INDEX, T the longest row;
        decoder_input_ids (B, T) each block's labels shifted right behind `</s>`. Packed (`pack`), a row holds
        several blocks, numbered in example_ids (B, S) and decoder_example_ids (B, T)."""
        if seq_len < 3:
            raise UserError(f"data.seq_len must be >= 3 for denoising, got {seq_len}")
        if split.n_sents < 1:
            raise ValueError("split has no sentences")
        blocks = (packed if self.pack else one_per_row)(split, vocab, gen, batch_size, seq_len, self.cross_documents)
        labels = torch.where(blocks.inside, blocks.ids, IGNORE_INDEX)
        src, sent_first = blocks.ids, blocks.sent_first
        if self.permute_ratio > 0:
            src, sent_first = permute_sentences(blocks, self.permute_ratio, gen)
        input_ids, attention_mask, enc_ex = self.corrupt(src, sent_first, blocks, vocab, gen,
                                                         self.positions_needed(seq_len))
        # The ids shifted behind `</s>`: packed, every block's decoder starts at the `</s>` that ends the block before.
        decoder_input_ids = F.pad(blocks.ids[:, :-1], (1, 0), value=vocab.eos)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "decoder_input_ids": decoder_input_ids}
        if self.pack:
            out |= {"example_ids": enc_ex, "decoder_example_ids": blocks.ex}
        return out

    def corrupt(self, src: torch.Tensor, sent_first: torch.Tensor, blocks: Blocks, vocab: Vocab,
                gen: torch.Generator, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Infilling, deletion, token masking, insertion, rotation and random replacement of the blocks in src
        (B, T), laid out as `blocks`; returns (input_ids (B, S), attention_mask (B, S), the source's block
        numbers (B, S) when packed, else None), S <= limit."""
        B, T = src.shape
        content = blocks.content
        # Words: a word-start piece or a sentence's first piece opens one.
        word_first = content & (torch.from_numpy(vocab.word_start[src.numpy()]) | sent_first)  # numpy's lookup: 3x
        masked, head, n_ins = self._infill(content, word_first, blocks, gen)
        single = None
        keep = blocks.inside & ~masked | head  # (B, T) positions that emit: frames, kept content, span heads
        if self.delete_ratio > 0 or self.token_mask_ratio > 0:
            u = torch.rand(B, T, generator=gen)
            rest = content & ~masked
            keep &= ~(rest & (u < self.delete_ratio))
            single = rest & (u >= self.delete_ratio) & (u < self.delete_ratio + self.token_mask_ratio)
        n_rand = None
        if self.insert_ratio > 0:
            k = (self.insert_ratio * blocks.n + 0.5).floor().long()  # (B, E) random tokens each block gets
            Q = int(k.max())
            gap = 1 + (torch.rand(*k.shape, Q, generator=gen) * (blocks.n + 1)[..., None]).long()  # 1..n+1
            gap = torch.where(torch.arange(Q) < k[..., None], blocks.first[..., None] + gap, T)  # row positions
            gap = gap.view(B, -1)
            n_rand = torch.zeros(B, T + 1, dtype=torch.long).scatter_add_(1, gap, (gap < T).long())[:, :T]
        value = src.masked_fill(head, vocab.mask)
        if single is not None:
            value = value.masked_fill(single, vocab.mask)
        out, total, out_ex = _emit(value, keep, n_ins, n_rand, vocab, gen, blocks if self.pack else None)
        return self._finish(out, total, out_ex, vocab, gen, limit)

    def _infill(self, content: torch.Tensor, word_first: torch.Tensor, blocks: Blocks,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text infilling on whole words (module docstring), block by block. Returns, each (B, T): masked (tokens
        removed, span heads included), head (a span's first token, which becomes its [MASK]) and n_ins ([MASK]s
        of zero-length spans inserted just before each position)."""
        B, T = content.shape
        if self.mask_ratio <= 0:
            return torch.zeros_like(content), torch.zeros_like(content), torch.zeros(B, T, dtype=torch.long)
        # Row-wide word numbers from 1: each block's words, then its `</s>` (where a span after its last word
        # inserts); 0 is a dummy word, never masked, that every other position reads.
        opens = word_first | blocks.eos
        wid = torch.cumsum(opens, 1)  # (B, T)
        W = int(wid[:, -1].max()) + 1
        first_word = wid.gather(1, blocks.first + 1)  # (B, E) the row-wide number of each block's word 0
        n_words = wid.gather(1, blocks.first + blocks.n + 1) - first_word  # (B, E): its `</s>` ends the count
        live_block = blocks.n.numpy() > 0  # (B, E); the spans of the k live blocks, then laid into their rows
        row = np.nonzero(live_block)[0]  # (k,)
        n_words, first_word = n_words.numpy()[live_block], first_word.numpy()[live_block]  # (k,)
        budget = np.floor(self.mask_ratio * n_words + 0.5).astype(np.int64)  # (k,) words to mask
        lengths, m, _ = (x.numpy() for x in poisson_spans(budget, self.poisson_lambda, gen))  # (k, S)
        start = place_spans(n_words, lengths, m, gen)  # (k, S) first word of each span, in its block
        live = np.arange(lengths.shape[1]) < m[:, None]
        start = np.where(live, start + first_word[:, None], 0) + (row * (W + 1))[:, None]  # flat (B, W + 1)
        pos_span = live & (lengths > 0)
        start, lengths, live, pos_span = (torch.from_numpy(x) for x in (start, lengths, live, pos_span))
        # Covered words: +1 at each span's first word, -1 just past its last, then a running sum.
        edge = torch.zeros(B * (W + 1), dtype=torch.long)
        edge.scatter_add_(0, start.flatten(), pos_span.flatten().long())
        edge.scatter_add_(0, (start + lengths).flatten(), -pos_span.flatten().long())
        covered = edge.view(B, W + 1).cumsum(1) > 0  # (B, W + 1)
        heads = torch.zeros(B * (W + 1), dtype=torch.bool).scatter_(0, start.flatten(), pos_span.flatten())
        wid_c = wid * content
        masked = covered.gather(1, wid_c)
        head = word_first & heads.view(B, W + 1).gather(1, wid_c)
        # A zero-length span at word w inserts before w's first piece; at a block's last word + 1, before `</s>`:
        # the first position of the flattened rows whose word number reaches w's (a few spans, so a search).
        n_ins = torch.zeros(B * T, dtype=torch.long)
        zero = live & (lengths == 0)
        if bool(zero.any()):
            at = torch.searchsorted((wid + (torch.arange(B) * (W + 1))[:, None]).view(-1), start[zero])
            n_ins.index_add_(0, at, torch.ones_like(at))
        return masked, head, n_ins.view(B, T)

    def _finish(self, out: torch.Tensor, total: torch.Tensor, out_ex: torch.Tensor | None, vocab: Vocab,
                gen: torch.Generator, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Cut sources to `limit` (keeping `</s>`), rotate each block, pad, and turn a `random_ratio` share of the
        [MASK]s into random ordinary tokens; returns (input_ids, attention_mask, out_ex), each (B, S)."""
        B, S = out.shape
        slot = torch.arange(S)
        if S > limit:  # pathological: more zero-length spans than masked words on a full row; keep `</s>`
            total = total.clamp(max=limit)
            out = out[:, :limit].scatter(1, (total - 1)[:, None], vocab.eos)
            S, slot = limit, slot[:limit]
            out_ex = out_ex[:, :limit] if out_ex is not None else None
        attention_mask = slot < total[:, None]  # (B, S)
        if self.rotate_ratio > 0:
            # Rotate each block's content (its slots but the first and last) to start at a random content token.
            g = out_ex if out_ex is not None else attention_mask.long()  # (B, S) block of each slot, 0 = pad
            st = torch.where(g != F.pad(g[:, :-1], (1, 0), value=-1), slot, 0).cummax(1).values  # block's first
            size = torch.zeros(B, int(g.max()) + 1, dtype=torch.long).scatter_add_(1, g, torch.ones_like(g))[:, 1:]
            c = (size - 2).clamp(min=1)  # (B, E)
            rot = torch.rand(c.shape, generator=gen) < self.rotate_ratio
            off = torch.where(rot, (torch.rand(c.shape, generator=gen) * c).long(), 0)
            gi = (g - 1).clamp(min=0)
            c_s, off_s = c.gather(1, gi), off.gather(1, gi)
            inner = (g > 0) & (slot > st) & (slot < st + size.gather(1, gi) - 1)
            out = out.gather(1, torch.where(inner, st + 1 + (slot - st - 1 + off_s) % c_s, slot))
        out = torch.where(attention_mask, out, vocab.pad)
        if self.random_ratio > 0:  # last, so the same seed masks the same spans whatever random_ratio is
            at = (out == vocab.mask).view(-1).nonzero()[:, 0]  # the [MASK]s, each a coin
            at = at[torch.rand(len(at), generator=gen) < self.random_ratio]
            out.view(-1)[at] = vocab.ordinary_ids[torch.randint(len(vocab.ordinary_ids), (len(at),), generator=gen)]
        return out, attention_mask.long(), out_ex

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Summed reconstruction cross-entropy over every target token and token accuracy."""
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            project=lm_terms(batch["labels"], "denoise", label_smoothing),  # (B, T) targets
            example_ids=batch.get("example_ids"),
            decoder_example_ids=batch.get("decoder_example_ids"),
        ).logits

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Loss in nats per target token of the best unigram model of the targets: the block tokens
        (unigram-distributed as in the split) plus one `<s>` and one `</s>` per block, their share 2/(n+2)
        estimated from the mean content length n of 4096 fixed blocks."""
        counts = split.unigram_counts(vocab.size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        h = float(-(p * np.log(p)).sum())
        starts = np.random.default_rng(0).integers(0, split.n_sents, 4096)
        _, n, _ = block_spans(split, starts, seq_len - 2, self.cross_documents)
        f = 2.0 / (float(n.mean()) + 2.0)  # share of frame tokens among targets
        return {"unigram_target_loss": (1 - f) * (h - math.log(1 - f)) + f * math.log(2 / f)}
