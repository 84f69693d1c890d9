"""Tests of the benchmark peers (benchmarks/peers.py) and the side-by-side batch benchmark (benchmarks/batches.py).

The peers must build what our objectives build (same fields, same shapes, the reference's statistics), or
the speed-ups `pretrain bench` prints compare different work. Splits use unique token ids (id - N_SPECIAL =
position in the split), so every token says where it came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.batches import bench_batches
from benchmarks.peers import PEERS, peer_clm_batch, peer_denoise_batch, peer_mlm_batch, peer_span_batch
from objectives import OBJECTIVES
from objectives.base import IGNORE_INDEX, make_generator
from pretrain.data import TokenSplit
from pretrain.tokenizer import N_SPECIAL, Vocab

B, T = 16, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # the benchmark measures one thread


@pytest.fixture(scope="module")
def data():
    """A split of 60 documents of 1-8 sentences of 3-30 tokens, ids N_SPECIAL + position; every 3rd ordinary
    id starts a word. Returns (split, vocab)."""
    rng = np.random.default_rng(0)
    docs, i = [], N_SPECIAL
    for _ in range(60):
        doc = []
        for _ in range(int(rng.integers(1, 9))):
            k = int(rng.integers(3, 30))
            doc.append(list(range(i, i + k)))
            i += k
        docs.append(doc)
    return TokenSplit.from_documents(docs), Vocab.synthetic(i + 10, word_start_every=3)


def ours(name: str, split, vocab, seed: int = 0):
    return OBJECTIVES[name]().batch(split, vocab, make_generator(seed, "test"), B, T)


def test_every_peer_returns_our_fields_and_shapes(data):
    split, vocab = data
    for name, (peer, _) in PEERS.items():
        a, b = ours(name, split, vocab), peer(split, vocab, np.random.default_rng(0), B, T)
        assert set(a) == set(b), name
        for k in a:
            assert b[k].dtype == torch.long, (name, k)
            if name == "denoise":  # padded per batch: same rows and rank, lengths within the block
                assert b[k].shape[0] == B and b[k].dim() == a[k].dim() and b[k].shape[-1] <= T + 40, (name, k)
            else:
                assert b[k].shape == a[k].shape, (name, k)


def test_clm_peer_rows_are_shifted_stream_slices(data):
    split, vocab = data
    b = peer_clm_batch(split, vocab, np.random.default_rng(1), B, T)
    x, y = b["input_ids"], b["labels"]
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x.diff(dim=1), torch.ones(B, T - 1, dtype=torch.long))  # consecutive unique ids


def test_mlm_peer_masks_bert_count_and_rates(data):
    split, vocab = data
    sel = mask = total = 0
    for seed in range(8):
        b = peer_mlm_batch(split, vocab, np.random.default_rng(seed), B, T)
        ids, labels, am = b["input_ids"], b["labels"], b["attention_mask"]
        n_real = am.sum(1)
        picked = labels != IGNORE_INDEX
        # BERT's count: round(n * 0.15) of the real tokens, [CLS]/[SEP] included, never them selected.
        assert torch.equal(picked.sum(1), torch.round(n_real.double() * 0.15).long().clamp(min=1))
        assert not (picked & ((ids == vocab.cls) | (ids == vocab.sep) | (am == 0))).any()
        assert ids[:, 0].eq(vocab.cls).all() and (b["token_type_ids"] * (1 - am)).sum() == 0
        sel += int(picked.sum())
        mask += int((picked & (ids == vocab.mask)).sum())
        total += int(n_real.sum())
    assert abs(sel / total - 0.15) < 0.01
    assert abs(mask / sel - 0.8) < 5 * (0.16 / sel) ** 0.5


def test_span_peer_round_trip_reproduces_the_window(data):
    split, vocab = data
    b = peer_span_batch(split, vocab, np.random.default_rng(2), B, T)
    n, tgt_len = OBJECTIVES["span"]().lengths(T)
    assert b["input_ids"].shape == (B, T) and b["labels"].shape == (B, tgt_len)
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    s0 = vocab.sentinel(0)
    for inp, tgt in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
        assert inp[-1] == tgt[-1] == vocab.eos and tgt[0] == s0
        spans, cur = {}, None  # sentinel -> the tokens it hides
        for t in tgt[:-1]:
            if s0 <= t < s0 + 100:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        out = [x for t in inp[:-1] for x in (spans[t] if s0 <= t < s0 + 100 else [t])]
        assert out == list(range(out[0], out[0] + n))  # the window, consecutive ids


def test_denoise_peer_blocks_and_fairseq_coverage(data):
    split, _ = data
    vocab = Vocab.synthetic(split.n_tokens + N_SPECIAL + 10)  # every piece starts a word: token = word
    masked = content = 0
    for seed in range(6):
        b = peer_denoise_batch(split, vocab, np.random.default_rng(seed), 32, T, random_ratio=0.0)
        labels, src, am = b["labels"], b["input_ids"], b["attention_mask"]
        for lab, s, m in zip(labels.tolist(), src.tolist(), am.tolist(), strict=True):
            lab = [t for t in lab if t != IGNORE_INDEX]
            s = s[: sum(m)]
            assert lab[0] == s[0] == vocab.bos and lab[-1] == s[-1] == vocab.eos
            assert lab[1:-1] == list(range(lab[1], lab[1] + len(lab) - 2))  # the clean block is the target
            assert set(s[1:-1]) - {vocab.mask} <= set(lab[1:-1])  # permuted and masked, nothing invented
            kept = sum(t != vocab.mask for t in s[1:-1])
            masked += len(lab) - 2 - kept
            content += len(lab) - 2
        assert torch.equal(b["decoder_input_ids"][:, 0], torch.full((32,), vocab.eos))
    # fairseq asks for ceil(0.3 W) words but its spans overlap: it covers less than 30%, about 27%.
    assert 0.24 < masked / content < 0.30


def test_bench_batches_rows_side_by_side(data):
    split, vocab = data
    rows = bench_batches(["clm", "mlm", "span", "prefix", "denoise"], 8, 64, 0.01, None, None,
                         split=split, vocab=vocab)
    by = {r["objective"]: r for r in rows}
    n_raw = OBJECTIVES["span"]().lengths(64)[0]
    assert list(by) == ["clm", "clm, doc_attention", "mlm", "mlm, pack", "span", f"span, raw {n_raw}", "prefix",
                        "prefix, pack", "denoise", "denoise, pack"]
    for name, r in by.items():
        assert r["ours_tokens_per_s"] > 0
        if name in ("prefix", "prefix, pack", "clm, doc_attention", "mlm, pack", "denoise, pack"):  # no such peer
            assert r["peer_tokens_per_s"] is None and r["speedup"] is None
        else:
            assert r["peer_tokens_per_s"] > 0 and r["speedup"] == pytest.approx(
                r["ours_tokens_per_s"] / r["peer_tokens_per_s"])
    assert by["span"]["tokens_per_batch"] == 8 * 64 and by[f"span, raw {n_raw}"]["tokens_per_batch"] == 8 * n_raw
    assert by["clm"]["ours_fill"] == by["clm"]["peer_fill"] == 1.0 and by["prefix"]["peer_fill"] is None
    assert 0 < by["mlm"]["ours_fill"] <= 1 and 0 < by["mlm"]["peer_fill"] <= 1
    assert by["mlm, pack"]["ours_fill"] > by["mlm"]["ours_fill"] and by["mlm, pack"]["target"] == 1e7  # fuller rows
    assert by["denoise, pack"]["ours_fill"] > by["denoise"]["ours_fill"] and by["denoise, pack"]["target"] == 1e7
    assert by["prefix, pack"]["ours_fill"] == 1.0 and by["prefix"]["ours_fill"] < 0.75
    assert by["mlm"]["target"] == by["span"]["target"] == by["clm"]["target"] == 1e7
