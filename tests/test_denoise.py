"""Tests of BART's denoising objective (objectives/denoise.py): exact structure on splits whose token ids are
unique (id - N_SPECIAL = position in the split, so every source token says where it came from), and the
statistics of masking, span lengths and random replacement on random-token splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives import OBJECTIVES
from objectives.base import IGNORE_INDEX, make_generator
from objectives.denoise import Denoising, poisson_spans
from pretrain.data import TokenSplit
from pretrain.errors import UserError
from pretrain.tokenizer import N_SPECIAL, Vocab

OFF = dict(mask_ratio=0.0, permute_ratio=0.0, random_ratio=0.0)  # every noise off


def unique_split(n_docs: int = 120, seed: int = 0, sent_len: tuple[int, int] = (3, 30), every: int = 1):
    """A split whose token at position i has id N_SPECIAL + i, and a vocabulary covering them."""
    rng = np.random.default_rng(seed)
    docs, i = [], N_SPECIAL
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 12))):
            k = int(rng.integers(*sent_len))
            doc.append(list(range(i, i + k)))
            i += k
        docs.append(doc)
    return TokenSplit.from_documents(docs), Vocab.synthetic(size=i, word_start_every=every)


def random_split(n_tokens: int = 60_000, V: int = 2000, seed: int = 0, every: int = 1):
    """Random ids; sentences ~25 tokens (3..47), documents ~10 sentences."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        doc = [list(rng.integers(N_SPECIAL, V, int(rng.integers(3, 48)))) for _ in range(int(rng.integers(1, 20)))]
        docs.append(doc)
        total += sum(map(len, doc))
    return TokenSplit.from_documents(docs), Vocab.synthetic(size=V, word_start_every=every)


@pytest.fixture(params=[False, True], ids=["one-per-row", "packed"])
def pack(request):
    """Each test of a batch runs on rows of one block and on packed rows."""
    return request.param


def make(pack: bool, **kw) -> Denoising:
    """The objective under test. Packed, blocks stop at their document's end unless a test says otherwise
    (fairseq's complete_doc), so that the rows hold several."""
    return Denoising(pack=pack, **({"cross_documents": False} | kw if pack else kw))


def rows(batch):
    """Per block: (source ids without padding, target content without `<s>`/`</s>`/padding); packed rows give
    each of their blocks, whose decoder input must be its own target shifted behind `</s>`."""
    out = []
    for i, (src, am, lab) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)):
        if "example_ids" not in batch:
            pieces = [(src[am.bool()], lab[lab != IGNORE_INDEX], None)]
        else:
            enc, dec = batch["example_ids"][i], batch["decoder_example_ids"][i]
            assert torch.equal(enc > 0, am.bool()) and torch.equal(dec > 0, lab != IGNORE_INDEX)
            pieces = [(src[enc == e], lab[dec == e], batch["decoder_input_ids"][i][dec == e])
                      for e in range(1, int(dec.max()) + 1)]
            assert int(enc.max()) == len(pieces)
        for s, t, d in pieces:
            s, t = s.tolist(), t.tolist()
            assert s[0] == 2 and s[-1] == 3 and t[0] == 2 and t[-1] == 3  # <s> first, </s> last, both sides
            assert d is None or d.tolist() == [3] + t[:-1]
            out.append((s[1:-1], t[1:-1]))
    return out


def sentences(ids, starts):
    """Cut a list of unique ids into sentences at the ids that open one."""
    cuts = [i for i, t in enumerate(ids) if t in starts] + [len(ids)]
    assert cuts[0] == 0
    return [tuple(ids[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


def align(src, tgt, mask=6):
    """Walk a source without permutation or random replacement against its target (unique ids): the kept
    tokens must appear in order, and every gap between them holds at most one [MASK], which stands for the
    whole removed run. Returns [(run start in tgt, run length)] per [MASK]."""
    index = {t: i for i, t in enumerate(tgt)}
    spans, prev, pending = [], -1, 0
    for t in src + [None]:
        if t == mask:
            pending += 1
            continue
        i = len(tgt) if t is None else index[t]
        assert i > prev, "kept tokens out of order"
        gap = i - prev - 1
        assert pending <= 1, "two [MASK]s for one removed run"
        assert gap == 0 or pending == 1, "tokens removed without a [MASK]"
        if pending:
            spans.append((prev + 1, gap))
        prev, pending = i, 0
    return spans


# ---------------------------------------------------------------- blocks, permutation, determinism


def test_registered_and_contract():
    assert OBJECTIVES["denoise"] is Denoising
    obj = Denoising()
    assert obj.arch.kind == "encoder-decoder" and obj.loss_terms == {"denoise_loss": "labels"}
    assert obj.default_recipe == "bart-tiny" and obj.positions_needed(512) == 512
    assert Denoising(insert_ratio=0.1).positions_needed(512) == 512 + 51


@pytest.mark.parametrize("cross", [True, False])
def test_target_is_clean_block_of_whole_sentences(cross, pack):
    split, vocab = unique_split()
    so = split.sent_offsets.tolist()
    sent_at = {o: s for s, o in enumerate(so)}
    L = 64
    b = make(pack, cross_documents=cross).batch(split, vocab, make_generator(1, "t"), 64, L)
    assert b["labels"].shape == b["decoder_input_ids"].shape and b["labels"].size(1) <= L
    assert (b["decoder_input_ids"][:, 0] == vocab.eos).all()  # decoder start = </s>
    lab = b["labels"].masked_fill(b["labels"] == IGNORE_INDEX, vocab.pad)
    assert torch.equal(b["decoder_input_ids"][:, 1:], lab[:, :-1])
    blocks = rows(b)
    room = [L - 2] * len(blocks)
    if pack:  # a packed row's last block may be the one drawn for the room its row had left
        room, tails = [], 0
        for dec in b["decoder_example_ids"]:
            k = int(dec.max())
            room += [L - 2] * (k - 1) + [L - 2 - int((dec == k).nonzero()[0])]
            tails += room[-1] < L - 2
        assert tails > 16  # most rows end with a tail block
    for (_, t), c in zip(blocks, room, strict=True):
        p = [x - N_SPECIAL for x in t]
        assert p == list(range(p[0], p[0] + len(p)))  # one contiguous stretch of the split
        assert p[0] in sent_at  # starting at a sentence start
        s0 = sent_at[p[0]]
        end = p[0] + len(p)
        if end in sent_at:  # whole sentences, as many as fit in the room (and within the document when asked)
            e = sent_at[end]
            stop = e == split.n_sents or so[e + 1] - p[0] > c
            if not cross:
                assert split.sent_doc[s0] == split.sent_doc[e - 1]
                stop = stop or split.sent_doc[e] != split.sent_doc[s0]
            assert stop
        else:  # or one over-long sentence cut to the room
            assert len(p) == c and so[s0 + 1] - p[0] > c


def test_permutation_only_shuffles_whole_sentences(pack):
    split, vocab = unique_split()
    starts = set((split.sent_offsets[:-1] + N_SPECIAL).tolist())
    b = make(pack, mask_ratio=0.0, random_ratio=0.0).batch(split, vocab, make_generator(2, "t"), 128, 96)
    moved = 0
    for s, t in rows(b):
        assert sorted(sentences(s, starts)) == sorted(sentences(t, starts))
        moved += s != t
    assert moved > 64  # most multi-sentence blocks come out in another order


def test_partial_permutation_moves_at_most_ceil_k_p_sentences(pack):
    split, vocab = unique_split()
    starts = set((split.sent_offsets[:-1] + N_SPECIAL).tolist())
    b = make(pack, mask_ratio=0.0, random_ratio=0.0, permute_ratio=0.3).batch(split, vocab, make_generator(3), 128, 96)
    moved_any = 0
    for s, t in rows(b):
        ss, ts = sentences(s, starts), sentences(t, starts)
        assert sorted(ss) == sorted(ts)
        moved = sum(a != c for a, c in zip(ss, ts, strict=True))
        assert moved <= math.ceil(len(ts) * 0.3)
        moved_any += moved > 0
    assert moved_any > 20


def test_same_seed_same_batch_other_seed_other_batch(pack):
    split, vocab = random_split(20_000)
    obj = make(pack, rotate_ratio=0.5, insert_ratio=0.1, delete_ratio=0.05, token_mask_ratio=0.05)
    a = obj.batch(split, vocab, make_generator(7, "train", 3), 16, 128)
    b = obj.batch(split, vocab, make_generator(7, "train", 3), 16, 128)
    c = obj.batch(split, vocab, make_generator(7, "train", 4), 16, 128)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])
    assert all(v.dtype == torch.int64 for v in a.values())


# ---------------------------------------------------------------- text infilling: exact structure


@pytest.mark.parametrize("every", [1, 3])
def test_infilling_masks_whole_word_spans_exactly(pack, every):
    split, vocab = unique_split(every=every)
    starts = set((split.sent_offsets[:-1] + N_SPECIAL).tolist())

    def opens_word(t):
        return vocab.word_start[t] or t in starts

    obj = make(pack, permute_ratio=0.0, random_ratio=0.0)
    b = obj.batch(split, vocab, make_generator(4), 128, 128)
    n_spans = 0
    for s, t in rows(b):
        spans = align(s, t)
        n_spans += len(spans)
        words = sum(map(opens_word, t))
        masked_words = sum(opens_word(x) for i, n in spans for x in t[i:i + n])
        assert masked_words == math.floor(0.3 * words + 0.5)  # the budget, exactly
        for i, n in spans:
            assert i == len(t) or opens_word(t[i])  # starts at a word start (zero-length: before one)
            assert i + n == len(t) or opens_word(t[i + n])  # and ends at a word end
        if every == 1:  # every piece a word: the token fraction is exact too
            assert sum(n for _, n in spans) == math.floor(0.3 * len(t) + 0.5)
    assert n_spans > 500


def test_no_special_piece_masked_moved_or_drawn(pack):
    split, vocab = random_split(20_000, every=2)
    obj = make(pack, random_ratio=0.5, rotate_ratio=0.5, insert_ratio=0.1, delete_ratio=0.05, token_mask_ratio=0.05)
    for seed in range(3):
        b = obj.batch(split, vocab, make_generator(seed), 64, 128)
        assert b["input_ids"].size(1) <= obj.positions_needed(128)
        for s, t in rows(b):  # rows() checks <s> first and </s> last
            assert not any(vocab.special[x] and x != vocab.mask for x in s)
            assert not any(vocab.special[x] for x in t)
        pad = b["attention_mask"] == 0
        assert (b["input_ids"][pad] == vocab.pad).all()
        assert (b["attention_mask"].sum(1) == b["attention_mask"].size(1)).any()  # padded to the longest row


# ---------------------------------------------------------------- statistics


def test_masked_token_fraction_is_0_3_within_5_sigma(pack):
    split, vocab = random_split(100_000, every=2)  # half the pieces start a word: words of 1, 2, 3... pieces
    obj = make(pack, permute_ratio=0.0, random_ratio=0.0)
    dev, n_tok = [], 0
    for seed in range(4):
        # align() needs unique ids: recover masked counts from lengths instead. A block's source holds its
        # n tokens less the masked ones, plus one [MASK] per span.
        b = obj.batch(split, vocab, make_generator(seed, "frac"), 128, 256)
        blocks = rows(b)
        n = torch.tensor([len(t) for _, t in blocks])
        masked = n - torch.tensor([len(s) - s.count(vocab.mask) for s, _ in blocks])
        dev.append((masked - 0.3 * n).double())
        n_tok += int(n.sum())
    d = torch.cat(dev)
    frac = 0.3 + float(d.sum()) / n_tok
    sigma = float(d.std()) * math.sqrt(len(d)) / n_tok
    assert abs(frac - 0.3) < 5 * sigma, (frac, sigma)
    assert sigma < 0.003  # the test has power: many blocks


def test_span_lengths_follow_poisson_3(pack):
    split, vocab = unique_split(n_docs=600, seed=5)
    # Blocks across documents, packed too: in short blocks each one's cut span is too large a share for the test.
    obj = make(pack, permute_ratio=0.0, random_ratio=0.0, cross_documents=True)
    lengths = []
    for seed in range(3):
        b = obj.batch(split, vocab, make_generator(seed, "poisson"), 96, 512)
        for s, t in rows(b):
            lengths += [n for _, n in align(s, t)]
    assert len(lengths) >= 10_000
    # Chi-square against Poisson(3), bins 0..7 and >= 8. Each block's one cut span (<= 1/40 of the spans
    # here, shorter than a draw) is included, which the test tolerates; the cut-free law is tested below.
    assert _chi2_poisson_p(np.array(lengths), 3.0) > 1e-3


def test_poisson_draws_sum_to_the_budget_and_are_poisson():
    gen = make_generator(0, "draws")
    budget = torch.randint(0, 300, (400,), generator=gen)
    budget[:5] = 0
    lengths, m, cut = poisson_spans(budget, 3.0, gen)
    assert torch.equal(lengths.sum(1), budget) and (m[:5] == 0).all()
    r = torch.arange(lengths.size(1))
    assert (lengths[r >= m[:, None]] == 0).all()
    # Every span but each row's cut one is a whole draw: i.i.d. Poisson(3).
    whole = (r < m[:, None]) & (r != cut[:, None])
    x = lengths[whole].numpy()
    assert len(x) > 15_000 and _chi2_poisson_p(x, 3.0) > 1e-3
    assert abs(x.mean() - 3.0) < 5 * math.sqrt(3.0 / len(x))
    assert (cut < m.clamp(min=1)).all() and len(set(cut[m > 50].tolist())) > 40  # the cut span sits anywhere


def _chi2_poisson_p(x: np.ndarray, lam: float) -> float:
    """p-value of Pearson's chi-square of x against Poisson(lam), bins 0..7 and >= 8 (8 degrees of freedom)."""
    k = np.arange(8)
    pmf = np.exp(k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k]))
    p = np.append(pmf, 1 - pmf.sum())
    obs = np.append(np.bincount(np.minimum(x, 8), minlength=9)[:8], (x >= 8).sum())
    exp = p * len(x)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    # Survival function of chi-square with 8 dof (even dof: closed form).
    return math.exp(-chi2 / 2) * sum((chi2 / 2) ** i / math.factorial(i) for i in range(4))


def test_random_replacement_rate_matches_setting(pack):
    split, vocab = random_split(40_000, every=2)
    n_masks = n_swapped = 0
    for seed in range(3):
        g = ("rr", seed)
        a = make(pack, random_ratio=0.0).batch(split, vocab, make_generator(*g), 128, 256)
        b = make(pack, random_ratio=0.1).batch(split, vocab, make_generator(*g), 128, 256)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        diff = a["input_ids"] != b["input_ids"]
        assert (a["input_ids"][diff] == vocab.mask).all()  # only [MASK]s change...
        assert (~vocab.special_t[b["input_ids"][diff]]).all()  # ...into ordinary pieces
        n_masks += int((a["input_ids"] == vocab.mask).sum())
        n_swapped += int(diff.sum())
    rate, sigma = n_swapped / n_masks, math.sqrt(0.1 * 0.9 / n_masks)
    assert abs(rate - 0.1) < 5 * sigma, (rate, sigma)


# ---------------------------------------------------------------- the off-by-default extras


def test_deletion_removes_tokens_in_order(pack):
    split, vocab = unique_split()
    b = make(pack, **OFF, delete_ratio=0.3).batch(split, vocab, make_generator(8), 128, 96)
    kept = total = 0
    for s, t in rows(b):
        assert vocab.mask not in s
        idx = [t.index(x) for x in s]
        assert idx == sorted(idx)  # a subsequence of the target
        kept, total = kept + len(s), total + len(t)
    assert abs(1 - kept / total - 0.3) < 5 * math.sqrt(0.21 / total)


def test_token_masking_replaces_single_tokens(pack):
    split, vocab = unique_split()
    b = make(pack, **OFF, token_mask_ratio=0.2).batch(split, vocab, make_generator(9), 128, 96)
    masked = total = 0
    for s, t in rows(b):
        assert len(s) == len(t) and all(x == y for x, y in zip(s, t, strict=True) if x != vocab.mask)
        masked, total = masked + s.count(vocab.mask), total + len(t)
    assert abs(masked / total - 0.2) < 5 * math.sqrt(0.16 / total)


def test_rotation_keeps_frame_and_rotates_content(pack):
    split, vocab = unique_split()
    b = make(pack, **OFF, rotate_ratio=1.0).batch(split, vocab, make_generator(10), 128, 96)
    rotated = 0
    for s, t in rows(b):  # rows() checks <s> and </s> stayed at the ends
        k = t.index(s[0])
        assert s == t[k:] + t[:k]
        rotated += k > 0
    assert rotated > 100


def test_insertion_adds_random_ordinary_tokens(pack):
    split, vocab = unique_split()
    b = make(pack, **OFF, insert_ratio=0.2).batch(split, vocab, make_generator(11), 128, 96)
    for s, t in rows(b):
        assert len(s) == len(t) + math.floor(0.2 * len(t) + 0.5)
        assert not any(vocab.special[x] for x in s)
        it = iter(s)
        assert all(x in it for x in t)  # the target is a subsequence of the source


def test_all_noise_at_once_is_consistent(pack):
    split, vocab = unique_split(every=2)
    obj = make(pack, permute_ratio=0.0, random_ratio=0.0, delete_ratio=0.1, insert_ratio=0.0)
    b = obj.batch(split, vocab, make_generator(12), 64, 128)
    for s, t in rows(b):  # deleted tokens leave no [MASK]; spans still leave one each
        kept = [x for x in s if x != vocab.mask]
        assert [t.index(x) for x in kept] == sorted(t.index(x) for x in kept)


def test_bad_hyper_parameters_raise_user_error():
    for kw in (dict(mask_ratio=1.5), dict(poisson_lambda=0.0), dict(random_ratio=-0.1),
               dict(permute_ratio=2.0), dict(delete_ratio=0.6, token_mask_ratio=0.6)):
        with pytest.raises(UserError):
            Denoising(**kw)


def test_baseline_is_target_unigram_entropy():
    split, vocab = random_split(20_000, V=400)
    h = Denoising().baseline(split, vocab)["unigram_target_loss"]
    assert math.log(400 - N_SPECIAL) * 0.97 < h < math.log(400)  # ~ uniform over 293 ids, plus the frame


# ---------------------------------------------------------------- loss with the encoder-decoder


def test_loss_counts_every_target_token_and_trains_both_stacks(pack):
    from models.config import ModelConfig
    from models.transformer import Transformer

    torch.manual_seed(0)
    split, vocab = random_split(20_000, V=500, every=2)
    obj = make(pack)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=32, d_ff=64, max_len=64, norm_placement="post",
                      embed_norm=True)
    model = Transformer(cfg, obj.arch, vocab.size)
    b = obj.batch(split, vocab, make_generator(0), 8, 64)
    terms = obj.loss(model, b)
    loss, count = terms["denoise_loss"]
    assert int(count) == int((b["labels"] != IGNORE_INDEX).sum())
    assert set(terms) == {"denoise_loss", "denoise_acc"}
    assert math.log(vocab.size) * 0.8 < float(loss.detach() / count) < math.log(vocab.size) * 1.5
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    enc = [g for n, g in grads.items() if "enc" in n and g.abs().sum() > 0]
    dec = [g for n, g in grads.items() if "dec" in n and g.abs().sum() > 0]
    assert enc and dec


@pytest.mark.parametrize("name", ["bart", "bart-tiny"])
def test_recipes_load_and_fit_the_position_table(name):
    from pretrain.config import config_from_dict
    from pretrain.recipes import read_recipe

    cfg = config_from_dict(read_recipe(name), name)
    assert isinstance(cfg.objective, Denoising) and cfg.objective.mask_ratio == 0.3
    assert cfg.objective.positions_needed(cfg.data.seq_len) <= cfg.model.max_len
