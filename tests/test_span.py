"""Tests for objectives/span.py: T5 span corruption and the prefix LM, against T5's exact lengths and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives import OBJECTIVES
from objectives.base import IGNORE_INDEX, make_generator
from objectives.span import PrefixLM, SpanCorruption, span_counts, span_lengths
from pretrain.data import TokenSplit
from pretrain.errors import UserError
from pretrain.tokenizer import MASK, N_SPECIAL, PAD, SENTINEL0, Vocab

N_TOKENS = 30_000
LITERAL = [107, 108, 109, 110]  # ordinary ids standing for the pieces of the literal texts "<pad>" / "[MASK]"


def _docs(rng: np.random.Generator, n_tokens: int, vocab_size: int, extra: list[int]) -> TokenSplit:
    """Documents of 1-80 tokens (so windows start and end inside documents), Zipf-ish ids, with the
    `extra` ids sprinkled in often; exactly n_tokens tokens in all."""
    ranks = np.arange(1, vocab_size - N_SPECIAL + 1)
    p = 1.0 / ranks
    ids = N_SPECIAL + rng.choice(len(ranks), size=n_tokens, p=p / p.sum())
    if extra:
        at = rng.random(n_tokens) < 0.05
        ids[at] = rng.choice(extra, size=int(at.sum()))
    cuts = np.cumsum(rng.integers(1, 81, size=n_tokens))
    cuts = np.concatenate([[0], cuts[cuts < n_tokens], [n_tokens]])
    docs = [[ids[a:b].tolist()] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return TokenSplit.from_documents(docs)


@pytest.fixture(scope="module")
def splits():
    """A position-coded split (token i of the stream is id N_SPECIAL + i, so a window names its own start),
    a text-like split with literal-"<pad>"/"[MASK]" piece ids, and one whose cache holds the raw special
    ids 0 and 6 (never produced by the tokenizer, but nothing may be filtered out if they were)."""
    rng = np.random.default_rng(0)
    pos_docs = TokenSplit.from_documents([[list(range(N_SPECIAL, N_SPECIAL + N_TOKENS))]])
    text = _docs(rng, N_TOKENS, 1000, LITERAL)
    raw = _docs(rng, N_TOKENS, 1000, [PAD, MASK])
    return pos_docs, text, raw


def _unpack(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[bool]]:
    """Substitute each target span back for its sentinel: the original window and its noise mask."""
    s_in = [i for i, t in enumerate(input_ids) if SENTINEL0 <= t < N_SPECIAL]
    s_tg = [i for i, t in enumerate(labels) if SENTINEL0 <= t < N_SPECIAL] + [len(labels) - 1]
    spans = {labels[a]: labels[a + 1 : b] for a, b in zip(s_tg[:-1], s_tg[1:], strict=True)}
    window, mask, prev = [], [], 0
    for i in s_in:
        window += input_ids[prev:i] + spans[input_ids[i]]
        mask += [False] * (i - prev) + [True] * len(spans[input_ids[i]])
        prev = i + 1
    window += input_ids[prev:-1]
    mask += [False] * (len(input_ids) - 1 - prev)
    return window, mask


def _inputs_len(n: int, d: float = 0.15, mu: float = 3.0) -> int:
    noise, spans = span_counts(n, d, mu)
    return n - noise + spans + 1


def test_registry_and_arch():
    assert OBJECTIVES["span"] is SpanCorruption and OBJECTIVES["prefix"] is PrefixLM
    assert SpanCorruption.arch.kind == "encoder-decoder" and SpanCorruption.loss_terms == {"span_loss": "labels"}
    assert PrefixLM.loss_terms == {"prefix_loss": "labels"}


def test_length_accounting_matches_t5():
    assert span_lengths(512) == (568, 114) and span_counts(568, 0.15, 3.0) == (85, 28)
    assert span_lengths(128) == (141, 29)
    assert span_lengths(256) == (284, 58)
    assert span_lengths(1024) == (1137, 229)
    for L in list(range(3, 300)) + [511, 513, 777, 1000, 1300]:
        n, t = span_lengths(L)
        noise, spans = span_counts(n, 0.15, 3.0)
        assert _inputs_len(n) == L, L  # exactly L_in: no padding needed
        assert _inputs_len(n + 1) > L, L  # n is the largest such length
        assert t == noise + spans + 1
    assert SpanCorruption().positions_needed(512) == 512


def _t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length):
    """google-research/text-to-text-transfer-transformer `t5/data/preprocessors.py` `random_spans_helper` with
    extra_tokens_per_span_inputs = extra_tokens_per_span_targets = 1, as T5 writes it (no logging)."""
    def _tokens_length_to_inputs_length_targets_length(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length - 1
    while _tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


DENSITIES = [round(0.05 * i, 2) for i in range(1, 19)]  # 0.05 .. 0.9, 0.5 among them


@pytest.mark.parametrize("mean_span", [1.0, 2.0, 3.0, 8.0, 64.0])
def test_span_lengths_are_t5s_random_spans_helper_at_every_density(mean_span):
    """Where T5's helper counts at least one span (the mask always makes one), span_lengths is the helper, its
    special case at 50% included; where the helper's count rounds to 0 the window is the largest one whose
    inputs, with the mask's one span, still fit. Real inputs never exceed seq_len, real targets never the
    reported length."""
    checked = hacked = 0
    for d in DENSITIES:
        for L in [16, 27, 31, 32, 64, 127, 128, 255, 256, 383, 384]:
            try:
                n, t = span_lengths(L, d, mean_span)
            except UserError:  # more spans than sentinels, or too few non-noise tokens: refused, never truncated
                continue
            h_n, h_t = _t5_random_spans_helper(L, d, mean_span)
            noise, spans = span_counts(n, d, mean_span)
            assert n - noise + spans + 1 <= L and noise + spans + 1 <= t, (d, L)
            if round(round(h_n * d) / mean_span) >= 1:
                assert (n, t) == (h_n, h_t), (d, L, mean_span)
                checked += 1
                hacked += d == 0.5 and n - noise + spans + 1 < L
            else:
                assert n < h_n and _inputs_len(n + 1, d, mean_span) > L, (d, L)
    assert checked >= 40 and (mean_span != 3 or hacked > 0), (checked, hacked)


def test_t5_special_case_at_half_density():
    """At 50% the helper drops one raw token when the targets would outgrow the inputs: 27 inputs -> 39 raw tokens
    would give 27 inputs but 28 targets, so T5 takes 38 raw tokens (26 inputs, 26 targets) and reports targets
    of 27; the batch then has 26 inputs (T5 pads them to 27) and round-trips."""
    assert span_lengths(27, 0.5, 3.0) == (38, 27) == _t5_random_spans_helper(27, 0.5, 3.0)
    assert span_lengths(128, 0.5, 3.0) == (190, 128)  # UL2's X-denoiser (mean 3, 50%) at 128 inputs
    assert span_lengths(128, 0.15, 64.0) == (148, 24)  # one span of 22 tokens: the helper's 149 would need 129
    pos = TokenSplit.from_documents([[list(range(N_SPECIAL, N_SPECIAL + 5000))]])
    b = SpanCorruption(noise_density=0.5).batch(pos, Vocab.synthetic(N_SPECIAL + 5000), make_generator(0), 4, 27)
    assert b["input_ids"].shape == (4, 26) and b["labels"].shape == (4, 26)
    for r in range(4):
        window, mask = _unpack(b["input_ids"][r].tolist(), b["labels"][r].tolist())
        assert window == list(range(window[0], window[0] + 38)) and sum(mask) == 19


def test_validation_errors(splits):
    with pytest.raises(UserError):
        SpanCorruption(noise_density=0.0)
    with pytest.raises(UserError):
        SpanCorruption(noise_density=1.0)
    with pytest.raises(UserError):
        SpanCorruption(mean_span=0.5)
    with pytest.raises(UserError, match="sentinels"):
        SpanCorruption().positions_needed(4096)  # ~103 spans > 100 sentinels
    with pytest.raises(UserError, match="non-noise"):
        SpanCorruption(noise_density=0.9, mean_span=1.0).positions_needed(64)
    tiny = TokenSplit.from_documents([[[200, 201, 202]]])
    with pytest.raises(UserError):
        SpanCorruption().batch(tiny, Vocab.synthetic(), make_generator(0), 2, 128)


@pytest.mark.parametrize("seq_len", [16, 128, 512])
def test_span_batches_roundtrip_exactly(splits, seq_len):
    """Every row: exact shapes, num_noise noise tokens in num_spans spans, mask starts non-noise and ends
    noise, sentinels in order, and substituting the spans back gives the original window: on the
    position-coded split (windows must be consecutive stream positions) and, with the same generator
    seeds, so the same starts and masks, on the text-like and raw-special splits."""
    pos, text, raw = splits
    vocab = Vocab.synthetic(N_SPECIAL + N_TOKENS)
    obj = SpanCorruption()
    n, tgt_len = obj.lengths(seq_len)
    num_noise, num_spans = span_counts(n, 0.15, 3.0)
    sentinels = [SENTINEL0 + k for k in range(num_spans)]
    B, n_batches = 16, {16: 40, 128: 25, 512: 6}[seq_len]
    inner_start = inner_end = 0
    for step in range(n_batches):
        bp = obj.batch(pos, vocab, make_generator(7, "t", step), B, seq_len)
        bt = obj.batch(text, vocab, make_generator(7, "t", step), B, seq_len)
        br = obj.batch(raw, vocab, make_generator(7, "t", step), B, seq_len)
        for b in (bp, bt, br):
            assert b["input_ids"].shape == (B, seq_len) and b["labels"].shape == (B, tgt_len)
            assert b["input_ids"].dtype == torch.int64 and b["decoder_input_ids"].shape == (B, tgt_len)
            assert (b["decoder_input_ids"][:, 0] == PAD).all()
            assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
        for r in range(B):
            window, mask = _unpack(bp["input_ids"][r].tolist(), bp["labels"][r].tolist())
            start = window[0] - N_SPECIAL
            assert window == list(range(window[0], window[0] + n))  # consecutive: exactly the window
            assert sum(mask) == num_noise and not mask[0] and mask[-1]
            assert sum(a and not p for p, a in zip([False] + mask[:-1], mask, strict=True)) == num_spans
            for b, split in ((bt, text), (br, raw)):
                ids, lab = b["input_ids"][r].tolist(), b["labels"][r].tolist()
                w2, m2 = _unpack(ids, lab)
                assert w2 == split.tokens[start : start + n].tolist() and m2 == mask
            # Special ids only where placed: sentinels in order, then </s> last (text split: the cache holds
            # the literal-"<pad>" pieces as ordinary ids, never id 0 or 6).
            ids, lab = bt["input_ids"][r].tolist(), bt["labels"][r].tolist()
            assert [t for t in ids if t < N_SPECIAL] == sentinels + [vocab.eos] and ids[-1] == vocab.eos
            assert [t for t in lab if t < N_SPECIAL] == sentinels + [vocab.eos] and lab[-1] == vocab.eos
            assert lab[0] == SENTINEL0
            d0 = np.searchsorted(text.doc_offsets, start, side="right") - 1
            d1 = np.searchsorted(text.doc_offsets, start + n - 1, side="right") - 1
            inner_start += start > text.doc_offsets[d0]
            inner_end += start + n < text.doc_offsets[d1 + 1]
        assert (bt["input_ids"].unsqueeze(-1) == torch.tensor(LITERAL)).any()  # literal-text ids do occur
        assert ((br["input_ids"] == PAD) | (br["input_ids"] == MASK)).any()  # raw 0/6 kept as data
    assert inner_start > 0 and inner_end > 0


def test_span_lengths_follow_uniform_composition(splits):
    """n = 568: noise spans of 85 tokens in k = 28 parts; P(len = l) = C(N-l-1, k-2) / C(N-1, k-1)
    (P(1) = (k-1)/(N-1)); the same law for the 483 non-noise tokens; mean span length exactly N/k."""
    _, text, _ = splits
    vocab, obj = Vocab.synthetic(1000), SpanCorruption()
    N, k = 85, 28
    noise_lens, keep_lens = [], []
    for step in range(60):
        b = obj.batch(text, vocab, make_generator(3, step), 64, 512)
        for field, out in (("labels", noise_lens), ("input_ids", keep_lens)):
            x = b[field]
            is_mark = (x >= SENTINEL0) & (x < N_SPECIAL) | (x == vocab.eos)  # (B, T): sentinels and </s>
            pos = is_mark.nonzero()[:, 1].view(x.size(0), k + 1)  # (B, k+1)
            if field == "labels":
                lens = pos.diff(dim=1) - 1  # (B, k): tokens between consecutive marks
            else:
                lens = torch.cat([pos[:, :1], pos[:, :-1].diff(dim=1) - 1], dim=1)  # runs before each sentinel
            out.append(lens)
    noise_lens, keep_lens = torch.cat(noise_lens), torch.cat(keep_lens)
    assert (noise_lens.sum(1) == N).all() and (noise_lens > 0).all()
    assert (keep_lens.sum(1) == 568 - N).all() and (keep_lens > 0).all()
    assert noise_lens.float().mean().item() == pytest.approx(N / k)
    for lens, total in ((noise_lens.flatten(), N), (keep_lens.flatten(), 568 - N)):
        for length in range(1, 8):
            law = math.comb(total - length - 1, k - 2) / math.comb(total - 1, k - 1)
            freq = (lens == length).float().mean().item()
            se = math.sqrt(law * (1 - law) / lens.numel())
            assert abs(freq - law) < 5 * se + 1e-3, (total, length, freq, law)
    assert (noise_lens == 1).float().mean().item() == pytest.approx((k - 1) / (N - 1), abs=0.01)
    # Exchangeable parts: the first and last span of a row follow the same law.
    assert noise_lens[:, 0].float().mean().item() == pytest.approx(N / k, abs=0.1)
    assert noise_lens[:, -1].float().mean().item() == pytest.approx(N / k, abs=0.1)


def test_pure_given_generator(splits):
    _, text, _ = splits
    vocab = Vocab.synthetic(1000)
    for obj in (SpanCorruption(), PrefixLM()):
        a = obj.batch(text, vocab, make_generator(1, "train", 5), 8, 64)
        b = obj.batch(text, vocab, make_generator(1, "train", 5), 8, 64)
        c = obj.batch(text, vocab, make_generator(1, "train", 6), 8, 64)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert not torch.equal(a["input_ids"], c["input_ids"])


def test_prefix_lm_roundtrip_and_uniform_split(splits):
    pos, _, _ = splits
    vocab, obj = Vocab.synthetic(N_SPECIAL + N_TOKENS), PrefixLM()
    seq_len, B = 16, 64
    n = seq_len - 1
    ks = []
    for step in range(60):
        b = obj.batch(pos, vocab, make_generator(2, step), B, seq_len)
        ids, am, lab = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.shape == am.shape == (B, seq_len) and lab.shape == b["decoder_input_ids"].shape == (B, n)
        k = am.sum(1) - 1  # (B,) prefix length (the encoder also reads </s>)
        assert ((ids == vocab.eos).sum(1) == 1).all() and (ids.gather(1, k[:, None]) == vocab.eos).all()
        assert (ids[am == 0] == PAD).all()
        assert ((lab != IGNORE_INDEX).sum(1) == n - k + 1).all()
        assert torch.equal(b["decoder_input_ids"][:, 1:], lab[:, :-1].clamp(min=PAD))
        for r in range(B):
            prefix = ids[r, : k[r]].tolist()
            rest = lab[r][lab[r] != IGNORE_INDEX].tolist()
            assert rest[-1] == vocab.eos
            window = prefix + rest[:-1]
            assert window == list(range(window[0], window[0] + n))
        ks.append(k)
    ks = torch.cat(ks)
    assert ks.min().item() >= 1 and ks.max().item() <= n - 1
    freq = torch.bincount(ks, minlength=n)[1:].float() / ks.numel()  # (n-1,) over k = 1..n-1
    assert (freq - 1 / (n - 1)).abs().max().item() < 0.02


def test_packed_prefix_lm_fills_both_stacks_with_two_uniform_antithetic_splits(splits):
    """Packed, a row holds two windows of m = seq_len - 2 tokens split at k and m - k: each example's prefix and
    rest are one contiguous window, both stacks' rows are all real, each decoder starts at <pad>, and k is
    uniform on [1, m - 1]."""
    pos, _, _ = splits
    vocab, obj = Vocab.synthetic(N_SPECIAL + N_TOKENS), PrefixLM(pack=True)
    seq_len, B = 16, 64
    m = seq_len - 2
    assert obj.decoder_length(seq_len) == seq_len and obj.packs_examples
    ks = []
    for step in range(40):
        b = obj.batch(pos, vocab, make_generator(3, step), B, seq_len)
        ids, lab, dec = b["input_ids"], b["labels"], b["decoder_input_ids"]
        assert ids.shape == lab.shape == dec.shape == (B, seq_len) and bool(b["attention_mask"].all())
        assert bool((lab != IGNORE_INDEX).all())
        for r in range(B):
            row = []
            for e in (1, 2):
                prefix, rest = ids[r][b["example_ids"][r] == e].tolist(), lab[r][b["decoder_example_ids"][r] == e]
                assert prefix[-1] == vocab.eos and rest[-1] == vocab.eos
                d = dec[r][b["decoder_example_ids"][r] == e].tolist()
                assert d == [PAD] + rest[:-1].tolist()  # teacher forcing within the example, from <pad>
                window = prefix[:-1] + rest[:-1].tolist()
                assert window == list(range(window[0], window[0] + m))
                row.append(len(prefix) - 1)
            assert row[0] + row[1] == m  # antithetic splits
            ks.append(row[0])
    ks = torch.tensor(ks)
    assert ks.min().item() >= 1 and ks.max().item() <= m - 1
    freq = torch.bincount(ks, minlength=m)[1:].float() / ks.numel()  # over k = 1..m-1
    assert (freq - 1 / (m - 1)).abs().max().item() < 0.03


def test_baselines_match_sampled_targets(splits):
    """The analytic unigram target loss equals the entropy of target tokens from sampled batches."""
    _, text, _ = splits
    vocab = Vocab.synthetic(1000)
    for obj, field in ((SpanCorruption(), "labels"), (PrefixLM(), "labels"), (PrefixLM(pack=True), "labels")):
        labels = torch.cat([obj.batch(text, vocab, make_generator(4, s), 64, 64)[field] for s in range(150)])
        labels = labels[labels != IGNORE_INDEX]
        p = torch.bincount(labels, minlength=vocab.size).double() / labels.numel()
        p = p[p > 0]
        empirical = -(p * p.log()).sum().item()
        expected = obj.baseline(text, vocab, seq_len=64)["unigram_target_loss"]
        assert empirical == pytest.approx(expected, abs=0.02), (obj.name, empirical, expected)


def _tiny_model(arch):
    transformer = pytest.importorskip("models.transformer")
    from models.config import ModelConfig

    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=32, d_ff=64, max_len=128, norm="rmsnorm",
                      positions="relative", activation="relu", bias=False)
    torch.manual_seed(0)
    return transformer.Transformer(cfg, arch, 1000)


def test_loss_counts_and_gradients(splits):
    _, text, _ = splits
    vocab = Vocab.synthetic(1000)
    for obj, seq_len in ((SpanCorruption(), 64), (PrefixLM(), 32)):
        model = _tiny_model(obj.arch)
        b = obj.batch(text, vocab, make_generator(0), 4, seq_len)
        terms = obj.loss(model, b)
        name = obj.name
        loss, count = terms[f"{name}_loss"]
        expected = 4 * obj.lengths(seq_len)[1] if name == "span" else (b["labels"] != IGNORE_INDEX).sum()
        assert count.item() == expected
        assert 0 <= terms[f"{name}_acc"][0].item() <= count.item()
        assert math.log(1000) - 1 < loss.item() / count.item() < math.log(1000) + 1  # near uniform at init
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
