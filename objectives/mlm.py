"""Masked language modelling with next-sentence prediction (BERT, Devlin et al. 2019) and its RoBERTa
variant (Liu et al. 2019), computed on the fly (dynamic masking) from the token cache.

BERT (`nsp = true`), after google-research/bert `create_pretraining_data.py` (`create_instances_from_document`,
`truncate_seq_pair`, `create_masked_lm_predictions`):
  - a target length of max_len - 3, or with probability `short_seq_prob` a uniform one in [2, max_len - 3];
  - a start sentence in a document; consecutive sentences of that document are gathered into a chunk
    until it reaches the target or the document ends; A = the first k sentences, k uniform in
    [1, n_chunk - 1];
  - with probability 0.5, B = the rest of the chunk (IsNext, label 0); otherwise B = consecutive
    sentences from a random start in a *different* document, filled up to target - len(A) (NotNext,
    label 1). Label convention as BERT and Hugging Face: **0 = IsNext, 1 = NotNext**;
  - while len(A) + len(B) > max_len - 3 the longer segment (ties: B) loses one token from a random end
    (front or back with probability 0.5 per token, so the front count is Binomial(r, 0.5));
  - `[CLS] A [SEP] B [SEP] <pad>...`, token_type_ids 0 through the first [SEP] and 1 after (0 on pads).
RoBERTa (`nsp = false`): FULL-SENTENCES packing: `<s>` + whole consecutive sentences of the document
stream (crossing documents, with `</s>` between two documents) up to max_len - 2 tokens + `</s>`, then
pads. This is fairseq's framing: every block starts with `<s>` (bos prepended) and ends with the `</s>`
that closes its last line. A sentence longer than the budget is cut.

Masking (both): candidates are the real, non-special pieces (never [CLS], [SEP], <s>, </s>, <pad>,
<unk>, [MASK] or a sentinel; HF excludes every special id too, BERT only [CLS]/[SEP]).
  - `exact` (BERT): per sequence min(max_predictions, max(1, round_half_even(n * mask_prob))) positions,
    n = the sequence's real tokens *including* [CLS]/[SEP] (or <s>/</s>) as BERT counts them
    (128 -> 19, 512 -> 77), chosen uniformly without replacement among the candidates.
  - `bernoulli` (HF, RoBERTa): an independent coin with probability mask_prob per candidate.
  - `whole_word`: a word (a piece with the word-boundary mark plus the continuation pieces after it;
    a continuation piece right after a special piece starts its own word) is selected or not as a unit.
    In exact mode words are taken in random order while their cumulative piece count stays within the
    budget (BERT skips a word that overflows and tries the next ones; we stop at the first, so a
    sequence may get a few pieces fewer than BERT would give it).
  - of the selected, `mask_frac` become [MASK], `random_frac` a random piece, the rest stay unchanged,
    decided per piece (as BERT, also with whole words) from one uniform draw: u < mask_frac -> [MASK],
    u < mask_frac + random_frac -> random, else unchanged. This is the same as the conditional draws of
    the references (of the non-[MASK] rest, random with probability random_frac / (1 - mask_frac)).
    Random pieces come from the ordinary (non-special) pieces only; the references can draw [CLS],
    [MASK], <pad>... here (BERT's `create_masked_lm_predictions` draws from the whole vocabulary, and so does
    transformers' `DataCollatorForLanguageModeling.torch_mask_tokens` with `torch.randint(len(tokenizer))`).
  - labels = the original piece at selected positions, IGNORE_INDEX elsewhere.

Deliberate deviations from create_pretraining_data.py (documented here, tested in tests/test_mlm.py):
  - pairs are drawn independently per sequence (documents weighted by their token count, which is how
    often BERT's pass over a document emits an instance; start sentence uniform within the document),
    and the short target is drawn per sequence instead of per document pass;
  - the random B's document is drawn with probability proportional to its tokens among the *other*
    documents (BERT: uniform over documents, 10 tries, so it can fall in A's document); it can only be
    A's document when the split has a single non-empty document;
  - a one-sentence chunk (the start sentence is the document's last, or longer than the target) is split
    inside the sentence at a uniform token boundary, so B is still a real continuation with probability
    0.5 and the NotNext rate stays 0.5; BERT forces a random B there. Only a chunk of a single token
    forces NotNext.

Loss: MLM cross-entropy over the selected positions only (the model projects to the vocabulary only
there, through `output_mask`) plus the NSP cross-entropy over sequences; the trainer divides each sum
by its global count (selected positions; sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch

from models.config import Arch
from objectives.base import IGNORE_INDEX, Batch, Framing, Objective, Terms, ce_terms, lm_terms
from objectives.clm import stream_windows
from objectives.packing import FirstFit, per_example, row_major, slots, within_examples
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


@dataclass(frozen=True)
class MaskedLM(Objective):
    """BERT's masked LM (+ next-sentence prediction), or RoBERTa's with `nsp = false`."""

    mask_prob: float = 0.15  # fraction of the maskable pieces selected for prediction
    mask_frac: float = 0.8  # of the selected, the fraction replaced by [MASK]
    random_frac: float = 0.1  # of the selected, the fraction replaced by a random ordinary piece (the rest stay)
    selection: Literal["exact", "bernoulli"] = "exact"  # exact: BERT's count per sequence; bernoulli: a coin each
    max_predictions: int = 0  # cap on selected pieces per sequence (BERT: 20 at 128, 80 at 512; 0 = no cap)
    nsp: bool = True  # BERT sentence pairs + next-sentence prediction; false = RoBERTa full-sentence packing
    short_seq_prob: float = 0.1  # NSP: probability of a shorter random target length (BERT: 0.1)
    whole_word: bool = False  # select whole words (a word-start piece and its continuations) as a unit
    pack: bool = False  # NSP: several pairs share a row, attention within each, instead of padding it (packing.py)

    name: ClassVar[str] = "mlm"
    default_recipe: ClassVar[str] = "bert-tiny"  # recipe used by `pretrain run --objective mlm` without --recipe

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"objective.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0 + 1e-12:
            raise UserError(
                f"objective.mask_frac ({self.mask_frac}) and objective.random_frac ({self.random_frac}) must be "
                ">= 0 with a sum <= 1 (the rest of the selected pieces stay unchanged)"
            )
        if self.selection not in ("exact", "bernoulli"):
            raise UserError(f"objective.selection must be 'exact' or 'bernoulli', got {self.selection!r}")
        if self.max_predictions < 0:
            raise UserError(f"objective.max_predictions must be >= 0 (0 = no cap), got {self.max_predictions}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"objective.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if self.pack and not self.nsp:
            raise UserError("objective.pack packs NSP sentence pairs; RoBERTa's full-sentence blocks (nsp = false) "
                            "fill their rows already: leave pack off")

    # `arch` and `loss_terms` depend on `nsp`, so they are properties rather than ClassVars; everything reads
    # them from the instance. Sequences are seq_len tokens long, specials included (the default
    # `positions_needed`), and no special piece is ever a target (the default `special_targets`).
    @property
    def arch(self) -> Arch:
        """An encoder with BERT's MLM head; segment embeddings and a 2-way [CLS] classifier for NSP."""
        return Arch(kind="encoder", segments=self.nsp, lm_transform=True, classifier=2 if self.nsp else 0)

    @property
    def loss_terms(self) -> dict[str, str]:
        """mlm_loss counts the selected positions (labels); nsp_loss the sequences."""
        terms = {"mlm_loss": "labels"}
        if self.nsp:
            terms["nsp_loss"] = "next_sentence_label"
        return terms

    @property
    def packs_examples(self) -> bool:
        """Packed NSP pairs: next_sentence_label is (B, E), one per pair of a row."""
        return self.pack

    def framing(self, vocab: Vocab) -> Framing:
        """`[CLS] text [SEP]` with NSP (segment A alone), `<s> text </s>` for RoBERTa packing."""
        return Framing((vocab.cls,), (vocab.sep,)) if self.nsp else Framing((vocab.bos,), (vocab.eos,))

    def batch(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """Sentence pairs (NSP) or full-sentence blocks, then dynamic masking. Pure given `gen`."""
        if self.pack:
            return self._packed(split, vocab, gen, batch_size, seq_len)
        out = self.layout(split, vocab, gen, batch_size, seq_len)
        out["input_ids"], out["labels"] = self.mask(out["input_ids"], vocab, gen)
        return out

    def layout(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """The clean (uncorrupted) sequences: input_ids, attention_mask (+ token_type_ids and
        next_sentence_label with NSP), all (B, T) int64 except the label (B,)."""
        if split.n_tokens < 2:
            raise ValueError(f"split has {split.n_tokens} tokens; masked LM needs at least 2")
        if self.nsp:
            return _sentence_pairs(split, vocab, gen, batch_size, seq_len, self.short_seq_prob)
        return _full_sentences(split, vocab, gen, batch_size, seq_len)

    def _packed(self, split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, T: int) -> Batch:
        """BERT's pairs packed first-fit into B rows of T (objectives/packing.py), then masked in place, each pair
        with its own budget: next_sentence_label (B, E) per example, IGNORE_INDEX past a row's examples;
        example_ids (B, T)."""
        if split.n_tokens < 2:
            raise ValueError(f"split has {split.n_tokens} tokens; masked LM needs at least 2")
        spans, row, off = _pairs_for_rows(split, gen, B, T, self.short_seq_prob)
        k = len(row)
        each, local = row_major(row, off, (B, T))  # every position's pair, and its index within it
        la, lb = each(spans["la"][:k]), each(spans["lb"][:k])
        in_a, in_b = (local >= 1) & (local <= la), (local >= la + 2) & (local <= la + lb + 1)
        inside = local <= la + lb + 2  # else padding after the row's last pair
        src = np.where(in_a, each(spans["a0"][:k]) + local - 1, each(spans["b0"][:k]) + local - la - 2)
        ids = np.where(in_a | in_b, np.take(split.tokens, src, mode="clip"), vocab.sep)  # [SEP] after A and after B
        ids[local == 0] = vocab.cls
        ids[~inside] = vocab.pad
        slot = slots(row)
        out = {"example_ids": torch.from_numpy(np.where(inside, each(slot + 1), 0).astype(np.int64)).view(B, T),
               "token_type_ids": torch.from_numpy(((local >= la + 2) & inside).astype(np.int64)).view(B, T)}
        ids = torch.from_numpy(ids.astype(np.int64)).view(B, T)
        out["input_ids"], out["labels"] = self.mask(ids, vocab, gen, out["example_ids"])
        out["attention_mask"] = (out["example_ids"] > 0).long()
        out["next_sentence_label"] = per_example(torch.from_numpy(spans["not_next"].astype(np.int64)), row, slot, B)
        return out

    def mask(self, input_ids: torch.Tensor, vocab: Vocab, gen: torch.Generator,
             example_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Select and corrupt pieces of input_ids (B, T); returns (corrupted ids, labels), both (B, T). With
        example_ids (B, T) (packed rows), each example of a row is a sequence of its own: its own count of real
        tokens and its own budget."""
        B, T = input_ids.shape
        cand = torch.from_numpy(~vocab.special[input_ids.numpy()])  # (B, T) maskable: real, non-special pieces

        # Words: every candidate alone, or (whole_word) a word-start piece and the continuations after it.
        # A special piece ([CLS] first of all) starts every example, so no word crosses two.
        if self.whole_word:
            prev = torch.nn.functional.pad(cand[:, :-1], (1, 0), value=False)  # (B, T) previous is a candidate
            start = cand & (vocab.word_start_t[input_ids] | ~prev)
            wid = (start.cumsum(1) - 1).clamp_min(0)  # (B, T) word index of each piece
            word_len = torch.zeros(B, T, dtype=torch.long).scatter_add_(1, wid, cand.long())  # (B, T words)
        else:
            wid, word_len = None, cand.long()

        is_word = cand if wid is None else word_len > 0
        score = torch.where(is_word, torch.rand(B, T, generator=gen), 2.0)  # (B, T) per word; 2 = no word
        if self.selection == "bernoulli" and not self.max_predictions:
            take = score < self.mask_prob  # (B, T) an independent coin per word
        else:
            take = self._budgeted(score, word_len, input_ids != vocab.pad, example_ids, wid, cand)
        sel = (take.gather(1, wid) if wid is not None else take) & cand  # (B, T) selected pieces

        flat = torch.from_numpy(np.flatnonzero(sel.numpy()))  # the selected pieces, row-major (3x torch.nonzero)
        u = torch.rand(len(flat), generator=gen)  # one uniform each decides [MASK] / random / unchanged
        rand = flat[(u >= self.mask_frac) & (u < self.mask_frac + self.random_frac)]
        ids = input_ids.clone(memory_format=torch.contiguous_format)
        ids.view(-1)[flat[u < self.mask_frac]] = vocab.mask
        ordinary = vocab.ordinary_ids
        ids.view(-1)[rand] = ordinary[torch.randint(len(ordinary), (len(rand),), generator=gen)]
        labels = torch.where(sel, input_ids, IGNORE_INDEX)
        return ids, labels

    def _budgeted(self, score: torch.Tensor, word_len: torch.Tensor, real: torch.Tensor,
                  example_ids: torch.Tensor | None, wid: torch.Tensor | None, cand: torch.Tensor) -> torch.Tensor:
        """(B, T) the words taken in random order (by `score`) while the sequence's piece count stays within its
        budget: BERT's round(n x mask_prob) (n its real tokens), or max_predictions with bernoulli coins.
        Packed rows sort each example's words apart (`packing.within_examples`: one int64 key of example, score
        and position) and count each from its own start."""
        p, B = self.mask_prob, score.size(0)
        if example_ids is None:
            n_real = real.sum(1, keepdim=True)  # (B, 1) BERT's n: every real token, [CLS]/[SEP] included
            group = None
        else:
            n_real = torch.zeros(B, int(example_ids.max()) + 1, dtype=torch.long).scatter_add_(1, example_ids,
                                                                                           real.long())  # (B, E+1)
            group = example_ids if wid is None else torch.zeros_like(example_ids).scatter_reduce_(
                1, wid, example_ids * cand, "amax")  # (B, T words) the example of each word
        if self.selection == "exact":
            limit = torch.round(n_real.double() * p).long().clamp_min(1)  # half to even, as Python's round
            if self.max_predictions:
                limit = limit.clamp_max(self.max_predictions)
        else:
            limit = torch.full_like(n_real, self.max_predictions)
        if group is None:
            sorted_score, order = score.sort(1)  # (B, T) words in random order
            count = word_len.gather(1, order).cumsum(1)
        else:
            order, sorted_score, count, g = within_examples(score, word_len, group)
            limit = limit.gather(1, g)
        keep = (count <= limit) & (sorted_score < 1.5)
        if self.selection == "bernoulli":
            keep &= sorted_score < p  # the coin's winners are a prefix of the random order
        return torch.zeros_like(keep).scatter_(1, order, keep)  # (B, T) per word

    def loss(self, model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Terms:
        """Summed MLM cross-entropy over the selected positions (+ summed NSP cross-entropy)."""
        labels = batch["labels"]
        sel = labels != IGNORE_INDEX  # (B, T)
        out = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            output_mask=sel,
            example_ids=batch.get("example_ids"),
            project=lm_terms(labels[sel], "mlm", label_smoothing),  # the rows of sel, row-major
        )
        terms = dict(out.logits)
        if self.nsp:  # packed: (B, E) labels, of which a slice of the rows may leave trailing columns all ignored
            nsp = batch["next_sentence_label"]
            terms |= ce_terms(out.cls_logits, nsp[:, : out.cls_logits.size(1)] if nsp.dim() == 2 else nsp, "nsp",
                              label_smoothing)
        return terms

    def baseline(self, split: TokenSplit, vocab: Vocab, seq_len: int = 128) -> dict[str, float]:
        """Masked-token accuracy of always predicting the most frequent maskable piece."""
        counts = split.unigram_counts(vocab.size).astype(np.float64)
        counts[vocab.special] = 0
        total = counts.sum()
        return {"majority_acc": float(counts.max() / total)} if total > 0 else {}


def _pairs_for_rows(split: TokenSplit, gen: torch.Generator, B: int, T: int, short_seq_prob: float):
    """BERT pairs drawn in order until first-fit fills B rows of T: 2 a row, then as many as the lengths so far say
    fill the rest, with a 20% margin. Returns (spans, row, off): `_pair_spans` of every pair drawn, in order, and
    the row and offset of the first len(row) of them, which `_packed` keeps."""
    parts, packer, draw, n_drawn, total = [], FirstFit(B, T), 2 * B, 0, 0
    while True:
        part = _pair_spans(split, gen, draw, T, short_seq_prob)
        parts.append(part)
        lengths = part["la"] + part["lb"] + 3
        n_drawn, total = n_drawn + draw, total + int(lengths.sum())
        if packer.add(lengths):
            break
        draw = max(B, int(1.2 * B * T * n_drawn / total) - n_drawn)
    spans = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return (spans, *packer.placed())


def _uniform_below(u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Integers uniform in [0, n) from uniforms u in [0, 1) (float64, so exact for any realistic n)."""
    return np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))


def _sentence_pairs(split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, T: int,
                    short_seq_prob: float) -> Batch:
    """BERT's `[CLS] A [SEP] B [SEP]` pairs, vectorized over the batch (see the module docstring)."""
    p = _pair_spans(split, gen, B, T, short_seq_prob)
    # [CLS] A [SEP] B [SEP] <pad>...: one gather from the token array.
    j = np.arange(T)[None, :]  # (1, T)
    la2, lb2, a0, b0 = p["la"][:, None], p["lb"][:, None], p["a0"][:, None], p["b0"][:, None]  # (B, 1)
    in_a = (j >= 1) & (j <= la2)
    in_b = (j >= la2 + 2) & (j <= la2 + lb2 + 1)
    src = np.where(in_a, a0 + j - 1, np.where(in_b, b0 + j - la2 - 2, 0))  # (B, T) token positions
    ids = np.where(in_a | in_b, split.tokens[src].astype(np.int64), vocab.pad)
    ids[:, 0] = vocab.cls
    ids[(j == la2 + 1) | (j == la2 + lb2 + 2)] = vocab.sep
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy((j <= la2 + lb2 + 2).astype(np.int64)),
        "token_type_ids": torch.from_numpy(((j >= la2 + 2) & (j <= la2 + lb2 + 2)).astype(np.int64)),
        "next_sentence_label": torch.from_numpy(p["not_next"].astype(np.int64)),  # 0 = IsNext, 1 = NotNext
    }


def _pair_spans(split: TokenSplit, gen: torch.Generator, B: int, T: int,
                short_seq_prob: float) -> dict[str, np.ndarray]:
    """B pairs drawn as BERT does (module docstring), as spans of the token array, each (B,) int64: A is
    tokens[a0 : a0 + la], B is tokens[b0 : b0 + lb]; not_next (bool) is the NSP label."""
    M = T - 3  # max_num_tokens: room for A and B
    off, soff, first = split.doc_offsets, split.sent_offsets, split.doc_first_sent
    N = split.n_tokens
    u = torch.rand(B, 8, generator=gen, dtype=torch.float64).numpy()  # (B, 8) every per-row draw

    # Target length; A's document (by token count) and start sentence (uniform in the document).
    t = np.where(u[:, 0] < short_seq_prob, 2 + _uniform_below(u[:, 1], np.int64(M - 1)), M)  # (B,)
    d = np.searchsorted(off, _uniform_below(u[:, 2], np.int64(N)), side="right") - 1  # (B,) never empty
    s = first[d] + _uniform_below(u[:, 3], first[d + 1] - first[d])  # (B,) start sentence

    # Chunk = sentences [s, e): add sentences until the length reaches t or the document ends.
    c0 = soff[s]
    e = np.minimum(np.searchsorted(soff, c0 + t, side="left"), first[d + 1])  # e >= s + 1
    c1 = soff[e]
    n_chunk = e - s
    # A = the first k sentences (k uniform in [1, n_chunk - 1]); a one-sentence chunk splits inside it.
    k = 1 + _uniform_below(u[:, 4], np.maximum(n_chunk - 1, 1))
    a_multi = soff[np.minimum(s + k, len(soff) - 1)]
    a_single = c0 + 1 + _uniform_below(u[:, 4], np.maximum(c1 - c0 - 1, 1))
    a1 = np.where(n_chunk >= 2, a_multi, np.where(c1 - c0 >= 2, a_single, c1))
    not_next = (u[:, 5] < 0.5) | (a1 == c1)  # a one-token chunk has no continuation: NotNext, as BERT

    # Random B: a document other than d (by token count), a uniform start sentence, filled to t - len(A).
    len_d = off[d + 1] - off[d]
    other = N - len_d  # tokens outside A's document (0: a single document, B must come from it)
    r = _uniform_below(u[:, 6], np.where(other > 0, other, N))
    r = r + np.where((other > 0) & (r >= off[d]), len_d, 0)  # skip A's document
    d2 = np.searchsorted(off, r, side="right") - 1
    s2 = first[d2] + _uniform_below(u[:, 7], first[d2 + 1] - first[d2])
    rb0 = soff[s2]
    tb = np.maximum(t - (a1 - c0), 1)
    rb1 = soff[np.minimum(np.searchsorted(soff, rb0 + tb, side="left"), first[d2 + 1])]
    a0 = c0
    b0 = np.where(not_next, rb0, a1)
    b1 = np.where(not_next, rb1, c1)

    la2, lb2, front = _truncate_pair(a1 - a0, b1 - b0, M, gen)
    return {"a0": a0 + front[:, 0], "la": la2, "b0": b0 + front[:, 1], "lb": lb2, "not_next": not_next}


def _truncate_pair(la: np.ndarray, lb: np.ndarray, M: int, gen: torch.Generator):
    """BERT's `truncate_seq_pair`: one token at a time from the longer segment (ties: B) until the pair fits
    in M. Returns the final lengths (B,) in closed form and the tokens cut from the front of each segment
    (B, 2): the front/back split of each removal count is Binomial(r, 0.5)."""
    over = la + lb > M
    la2 = np.where(over, np.minimum(la, np.maximum(M - lb, (M + 1) // 2)), la)
    lb2 = np.where(over, np.minimum(lb, M - la2), lb)
    removed = torch.from_numpy(np.stack([la - la2, lb - lb2], 1).astype(np.float64))  # (B, 2)
    front = torch.binomial(removed, torch.full_like(removed, 0.5), generator=gen).numpy().astype(np.int64)
    return la2, lb2, front


def _full_sentences(split: TokenSplit, vocab: Vocab, gen: torch.Generator, B: int, T: int) -> Batch:
    """RoBERTa's FULL-SENTENCES blocks: `<s>` + whole sentences of the `</s>`-joined document stream
    (at most T - 2 tokens, starting at a uniform random sentence) + `</s>` + pads."""
    off, soff = split.doc_offsets, split.sent_offsets
    L = T - 2
    s0 = _uniform_below(torch.rand(B, generator=gen, dtype=torch.float64).numpy(), np.int64(split.n_sents))
    sent_doc = split.sent_doc
    v0 = soff[s0] + sent_doc[s0]  # (B,) virtual stream start (document d is shifted by d separators)
    vstart = split.stream_starts  # (D,) virtual start of each document
    vL = v0 + L  # (B,) exclusive virtual end of the budget
    dL = np.searchsorted(vstart, vL, side="right") - 1
    rL = np.minimum(off[dL] + (vL - vstart[dL]), off[dL + 1])  # the budget's end in the real token array
    jL = np.searchsorted(soff, rL, side="right") - 1  # sentences [s0, jL) end within the budget
    full = soff[jL] + sent_doc[np.maximum(jL - 1, 0)] - v0  # their virtual length
    n = np.where(jL > s0, full, L)[:, None]  # (B, 1) content length; a too-long first sentence is cut

    w = stream_windows(split, torch.from_numpy(v0), L, vocab.eos).numpy()  # (B, L)
    j = np.arange(T)[None, :]  # (1, T)
    ids = np.full((B, T), vocab.pad, np.int64)
    ids[:, 1:-1] = np.where(j[:, :L] < n, w, vocab.pad)
    ids[:, 0] = vocab.bos
    ids[j == n + 1] = vocab.eos
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy((j <= n + 1).astype(np.int64))}
