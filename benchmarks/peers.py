"""Benchmark peers: per-example batch construction the way the reference implementations do it.

`pretrain bench` times each objective's vectorized `batch` beside one of these, on the same TokenSplit,
the same batch shape and one thread, so the speed-up it prints is measured, not claimed. Each peer is our
own straightforward NumPy/Python rendering of the reference algorithm (the files are named below; no
code is copied): one example at a time with a Python loop per example, then a collate into the same
fields our objective returns (int64 torch tensors, Hugging Face names). They are benchmark yardsticks,
not features: defaults only, nothing configurable beyond what the benchmark and its tests need.

- `peer_mlm_batch`  google-research/bert `create_pretraining_data.py`: one
  `create_instances_from_document` instance per row (chunk of sentences up to the target length, A/B
  split, random-next B from another document with 10 tries, `truncate_seq_pair` one token at a time),
  then `create_masked_lm_predictions`: shuffle the candidate positions (all but [CLS]/[SEP]) and walk
  them in a Python loop, 80% [MASK] / 10% kept / 10% a random id of the *whole* vocabulary, with
  Python's `random.Random` as BERT uses. Rows start at a random sentence of a token-weighted document
  instead of BERT's sequential pass (same per-instance work).
- `peer_span_batch` google-research/text-to-text-transfer-transformer `t5/data/preprocessors.py`:
  `random_spans_noise_mask` and `noise_span_to_unique_sentinel`/`nonnoise_span_to_unique_sentinel`, per
  example in NumPy as HF's `run_t5_mlm_flax.py` collator does: a shuffled cut-point indicator per
  segmentation, cumsums, boolean compaction; `</s>` appended after noising. The window length comes from
  our `span_lengths`, which is T5's `random_spans_helper` in closed form (568 raw tokens for 512 inputs).
- `peer_denoise_batch` fairseq `fairseq/data/denoising_dataset.py` (`DenoisingDataset`), BART's final setting (mask
  0.3, span-poisson lambda 3, replace_length 1, mask_random 0.1, permute 1.0, no insert/rotate):
  `permute_sentences` (a Python loop over sentences), `add_whole_word_mask` (word starts drawn without
  replacement, so spans may overlap and cover ~27% instead of 30%; spans grown one step at a time in a
  while loop; random replacements from [1, V), specials included) and `add_insertion_noise` for
  zero-length spans, then the collater's padding. Blocks of whole sentences from the cache's offsets
  (fairseq cuts them at full-stop tokens).
- `peer_clm_batch`  nanoGPT `train.py` `get_batch`: `torch.stack` of per-row slices
  `data[i:i+T]` and `data[i+1:i+1+T]` (nanoGPT's file already holds the end-of-text separators; we slice
  the cache's tokens as they are).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from objectives.base import IGNORE_INDEX
from objectives.span import span_counts, span_lengths

if TYPE_CHECKING:
    from pretrain.data import TokenSplit
    from pretrain.tokenizer import Vocab


def _collate(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    """(B, width) int64 from ragged Python lists, right-filled with `fill`."""
    out = np.full((len(rows), width), fill, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------- BERT


def _bert_instance(split: TokenSplit, vocab: Vocab, rnd: random.Random, T: int, short_seq_prob: float):
    """One `[CLS] A [SEP] B [SEP]` pair as BERT's create_instances_from_document builds it: (tokens,
    segment_ids, is_random_next) as Python lists."""
    max_num = T - 3
    target = rnd.randint(2, max_num) if rnd.random() < short_seq_prob else max_num
    off, soff, first = split.doc_offsets, split.sent_offsets, split.doc_first_sent

    def sent(k: int) -> list[int]:  # sentence k as a Python list, as BERT holds its documents in memory
        return split.tokens[soff[k]:soff[k + 1]].tolist()

    d = int(np.searchsorted(off, rnd.randrange(split.n_tokens), side="right")) - 1
    f0, f1 = int(first[d]), int(first[d + 1])
    i = rnd.randrange(f0, f1)
    chunk, length = [], 0
    while i < f1:  # gather sentences until the target length or the document's end
        chunk.append(sent(i))
        length += len(chunk[-1])
        if length >= target:
            break
        i += 1
    a_end = rnd.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
    a = [t for s in chunk[:a_end] for t in s]
    b: list[int] = []
    random_next = len(chunk) == 1 or rnd.random() < 0.5
    if random_next:
        for _ in range(10):  # BERT tries 10 times for another document
            rd = rnd.randint(0, split.n_docs - 1)
            if rd != d:
                break
        g0, g1 = int(first[rd]), int(first[rd + 1])
        for k in range(rnd.randint(g0, g1 - 1), g1):
            b.extend(sent(k))
            if len(b) >= target - len(a):
                break
    else:
        b = [t for s in chunk[a_end:] for t in s]
    while len(a) + len(b) > max_num:  # truncate_seq_pair: the longer one loses a token at a random end
        longer = a if len(a) > len(b) else b
        del longer[0 if rnd.random() < 0.5 else -1]
    tokens = [vocab.cls, *a, vocab.sep, *b, vocab.sep]
    return tokens, [0] * (len(a) + 2) + [1] * (len(b) + 1), random_next


def _bert_mask(tokens: list[int], vocab: Vocab, rnd: random.Random, mask_prob: float, max_predictions: int):
    """create_masked_lm_predictions: (corrupted tokens, labels) with a Python loop over shuffled candidates."""
    cand = [i for i, t in enumerate(tokens) if t != vocab.cls and t != vocab.sep]
    rnd.shuffle(cand)
    n_pred = max(1, int(round(len(tokens) * mask_prob)))
    if max_predictions:
        n_pred = min(max_predictions, n_pred)
    out = list(tokens)
    labels = [IGNORE_INDEX] * len(tokens)
    for i in cand[:n_pred]:
        if rnd.random() < 0.8:
            out[i] = vocab.mask
        elif rnd.random() >= 0.5:  # else keep the original
            out[i] = rnd.randint(0, vocab.size - 1)  # the whole vocabulary, specials included, as BERT
        labels[i] = tokens[i]
    return out, labels


def peer_mlm_batch(split: TokenSplit, vocab: Vocab, rng: np.random.Generator, B: int, T: int,
                   mask_prob: float = 0.15, max_predictions: int = 0, short_seq_prob: float = 0.1) -> dict:
    """BERT MLM + NSP batch, one instance at a time (see the module docstring); our MaskedLM's fields."""
    rnd = random.Random(int(rng.integers(1 << 62)))  # BERT draws everything from Python's random
    ids, types, labels, nsp = [], [], [], []
    for _ in range(B):
        tokens, seg, random_next = _bert_instance(split, vocab, rnd, T, short_seq_prob)
        out, lab = _bert_mask(tokens, vocab, rnd, mask_prob, max_predictions)
        ids.append(out), types.append(seg), labels.append(lab), nsp.append(int(random_next))
    return {
        "input_ids": _collate(ids, T, vocab.pad),
        "attention_mask": _collate([[1] * len(r) for r in ids], T, 0),
        "token_type_ids": _collate(types, T, 0),
        "labels": _collate(labels, T, IGNORE_INDEX),
        "next_sentence_label": torch.tensor(nsp, dtype=torch.long),  # 1 = random next, as BERT
    }


# ------------------------------------------------------------------------------------------------------ T5


def _t5_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """(num_segments,) lengths of a uniform random composition: shuffle num_segments - 1 cut marks."""
    marks = np.arange(num_items - 1) < num_segments - 1
    rng.shuffle(marks)
    seg_id = np.cumsum(np.concatenate([[0], marks]))
    return np.bincount(seg_id, minlength=num_segments)


def _t5_noise_mask(n: int, num_noise: int, num_spans: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: random_spans_noise_mask, non-noise first, noise last."""
    lengths = np.stack([_t5_segmentation(n - num_noise, num_spans, rng),
                        _t5_segmentation(num_noise, num_spans, rng)], 1).reshape(-1)  # (2S,) interleaved
    start = np.zeros(n, np.int64)
    start[np.cumsum(lengths)[:-1]] = 1
    return np.cumsum(start) % 2 == 1


def _t5_sentinels(tokens: np.ndarray, noise: np.ndarray, vocab: Vocab) -> np.ndarray:
    """noise_span_to_unique_sentinel: each noise run -> its sentinel (in order), the rest of the run dropped."""
    prev = np.concatenate([[False], noise[:-1]])
    first = noise & ~prev
    out = np.where(first, vocab.sentinel(0) + np.cumsum(first) - 1, tokens)
    return out[~(noise & prev)]


def peer_span_batch(split: TokenSplit, vocab: Vocab, rng: np.random.Generator, B: int, T: int,
                    noise_density: float = 0.15, mean_span: float = 3.0) -> dict:
    """T5 span corruption, one window at a time: input_ids (B, T), labels/decoder_input_ids (B, targets)."""
    n, _ = span_lengths(T, noise_density, mean_span)
    num_noise, num_spans = span_counts(n, noise_density, mean_span)
    inputs, targets = [], []
    for _ in range(B):
        s = int(rng.integers(0, split.n_tokens - n + 1))
        w = split.tokens[s:s + n].astype(np.int64)
        noise = _t5_noise_mask(n, num_noise, num_spans, rng)
        inputs.append(np.append(_t5_sentinels(w, noise, vocab), vocab.eos))
        targets.append(np.append(_t5_sentinels(w, ~noise, vocab), vocab.eos))
    labels = torch.from_numpy(np.stack(targets))
    return {
        "input_ids": torch.from_numpy(np.stack(inputs)),
        "labels": labels,
        "decoder_input_ids": torch.cat([labels.new_full((B, 1), vocab.pad), labels[:, :-1]], 1),
    }


# ---------------------------------------------------------------------------------------------------- BART


def _fairseq_permute(src: np.ndarray, ends: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """permute_sentences: ends (k,) are sentence ends (exclusive) in src; <s> and </s> stay."""
    k = len(ends)
    n_perm = math.ceil(k * p)
    subs = rng.permutation(k)[:n_perm]
    order = np.arange(k)
    order[subs] = subs[rng.permutation(n_perm)]
    out, at = src.copy(), 1
    for i in order:  # fairseq's loop over sentences
        s = src[(ends[i - 1] if i > 0 else 1):ends[i]]
        out[at:at + len(s)] = s
        at += len(s)
    return out


def _fairseq_insert(src: np.ndarray, p: float, vocab: Vocab, random_ratio: float, rng: np.random.Generator):
    """add_insertion_noise: ceil(len * p) [MASK]s (a random_ratio share random ids) at inner positions."""
    n = math.ceil(len(src) * p)
    where = rng.permutation(len(src) + n - 2)[:n] + 1
    out = np.full(len(src) + n, -1, np.int64)
    n_rand = math.ceil(n * random_ratio)
    out[where[n_rand:]] = vocab.mask
    out[where[:n_rand]] = rng.integers(1, vocab.size, n_rand)
    out[out == -1] = src
    return out


def _fairseq_mask(src: np.ndarray, vocab: Vocab, p: float, lam: float, random_ratio: float,
                  rng: np.random.Generator) -> np.ndarray:
    """add_whole_word_mask with span-poisson lengths and replace_length 1 (spans may overlap)."""
    is_start = vocab.word_start[src].astype(np.int64)
    is_start[0] = is_start[-1] = 0
    budget = math.ceil(is_start.sum() * p)
    if budget == 0:
        return src
    lengths = rng.poisson(lam, budget)  # fairseq: a Categorical over the pmf cut where it drops below 1e-7
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.poisson(lam, budget)])
    cum = np.cumsum(lengths)
    i = int(np.argmax(cum >= budget))
    lengths[i] = budget - (cum[i - 1] if i else 0)
    lengths = lengths[: i + 1]
    n_ins = int((lengths == 0).sum())
    lengths = lengths[lengths > 0]
    if len(lengths) == 0:
        return _fairseq_insert(src, n_ins / len(src), vocab, random_ratio, rng)
    starts = np.flatnonzero(is_start)
    idx = starts[rng.permutation(len(starts))[: len(lengths)]]  # without replacement: spans may overlap
    lengths = lengths[: len(idx)]
    rand = rng.random(len(idx)) < random_ratio
    src = src.copy()
    src[idx] = vocab.mask
    src[idx[rand]] = rng.integers(1, vocab.size, int(rand.sum()))  # [1, V): specials included, as fairseq
    keep = np.ones(len(src), bool)
    is_start[-1] = 255  # a huge "word" at </s>: spans stop before it
    lengths = lengths - 1
    while len(idx):  # grow every span one token per step until it has covered its words
        lengths = lengths - is_start[idx + 1]
        go = lengths >= 0
        idx, lengths = idx[go] + 1, lengths[go]
        keep[idx] = False
    src = src[keep]
    return _fairseq_insert(src, n_ins / len(src), vocab, random_ratio, rng) if n_ins else src


def peer_denoise_batch(split: TokenSplit, vocab: Vocab, rng: np.random.Generator, B: int, T: int,
                       mask_ratio: float = 0.3, poisson_lambda: float = 3.0, random_ratio: float = 0.1,
                       permute_ratio: float = 1.0) -> dict:
    """BART denoising, one block at a time as fairseq's DenoisingDataset.__getitem__, then its collater:
    input_ids/attention_mask (B, S) padded to the longest source; labels/decoder_input_ids (B, L)."""
    so, C = split.sent_offsets, T - 2
    sources, targets = [], []
    for _ in range(B):
        s = int(rng.integers(0, split.n_sents))
        a = so[s]
        e = max(int(np.searchsorted(so, a + C, side="right")) - 1, s + 1)  # whole sentences within C tokens
        n = min(int(so[e]) - a, C)
        block = np.concatenate([[vocab.bos], split.tokens[a:a + n].astype(np.int64), [vocab.eos]])
        src = block
        if permute_ratio > 0:
            ends = np.minimum(so[s + 1:e + 1] - a, n) + 1  # sentence ends in block positions (<s> is 0)
            src = _fairseq_permute(src, ends, permute_ratio, rng)
        if mask_ratio > 0:
            src = _fairseq_mask(src, vocab, mask_ratio, poisson_lambda, random_ratio, rng)
        sources.append(src), targets.append(block)
    S, L = max(map(len, sources)), max(map(len, targets))
    labels = _collate(targets, L, IGNORE_INDEX)
    prev = _collate([np.concatenate([[vocab.eos], t[:-1]]) for t in targets], L, vocab.pad)  # </s> to the front
    return {
        "input_ids": _collate(sources, S, vocab.pad),
        "attention_mask": _collate([np.ones(len(r), np.int64) for r in sources], S, 0),
        "labels": labels,
        "decoder_input_ids": prev,
    }


# ----------------------------------------------------------------------------------------------------- CLM


def peer_clm_batch(split: TokenSplit, vocab: Vocab, rng: np.random.Generator, B: int, T: int) -> dict:
    """nanoGPT's get_batch: per-row slices stacked; input_ids and labels (B, T)."""
    data = split.tokens
    ix = rng.integers(0, split.n_tokens - T, B)
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    return {"input_ids": x, "labels": y}


PEERS = {  # objective name -> (peer function, what it mirrors)
    "clm": (peer_clm_batch, "nanoGPT get_batch"),
    "mlm": (peer_mlm_batch, "BERT create_pretraining_data"),
    "span": (peer_span_batch, "T5 preprocessors, per example"),
    "denoise": (peer_denoise_batch, "fairseq DenoisingDataset"),
}

TARGETS = {"clm": 10e6, "mlm": 10e6, "span": 10e6, "prefix": 10e6, "denoise": 10e6}  # batch tokens/s, 1 thread
