"""Tests of objectives/mlm.py: BERT masking (80/10/10, exact and bernoulli selection, whole words), NSP pairs,
RoBERTa full-sentence packing, the loss terms and the recipes.

Most tests use a synthetic split whose token ids encode their position (id = N_SPECIAL + position), so a
sequence can be traced back to the exact text it came from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives import OBJECTIVES
from objectives.base import IGNORE_INDEX, make_generator
from objectives.mlm import MaskedLM
from pretrain.data import TokenSplit
from pretrain.errors import UserError
from pretrain.tokenizer import N_SPECIAL, UNK, Vocab


def make_split(seed: int = 0, n_sents: int = 6000, max_sent: int = 30, max_doc: int = 40,
               unique: bool = True, vocab_size: int = 1000) -> TokenSplit:
    """A split with sentences of 1..max_sent tokens (plus a few longer than any budget) and documents of
    1..max_doc sentences. unique: token id = N_SPECIAL + position (needs a vocabulary that large)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_sent + 1, size=n_sents)
    lens[rng.random(n_sents) < 0.01] = 300  # sentences longer than the budget
    sent_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    per_doc = rng.integers(1, max_doc + 1, size=n_sents)
    starts = np.concatenate([[0], np.cumsum(per_doc)])
    starts = starts[starts < n_sents]
    doc_off = np.append(sent_off[starts], sent_off[-1]).astype(np.int64)
    N = int(sent_off[-1])
    tokens = N_SPECIAL + np.arange(N) if unique else rng.integers(N_SPECIAL, vocab_size, size=N)
    return TokenSplit(tokens=tokens.astype(np.uint32), doc_offsets=doc_off, sent_offsets=sent_off)


SPLIT = make_split()
VOCAB = Vocab.synthetic(N_SPECIAL + SPLIT.n_tokens)
DOC_OF = np.searchsorted(SPLIT.doc_offsets, np.arange(SPLIT.n_tokens), side="right") - 1  # token -> doc


def positions(ids: np.ndarray) -> np.ndarray:
    return ids - N_SPECIAL


def sigma5(n: int, p: float) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------ fields


def test_registered_and_fields_validated():
    assert OBJECTIVES["mlm"] is MaskedLM
    for bad in (dict(mask_prob=0.0), dict(mask_prob=1.0), dict(mask_frac=0.8, random_frac=0.3),
                dict(random_frac=-0.1), dict(selection="topk"), dict(max_predictions=-1),
                dict(short_seq_prob=1.5)):
        with pytest.raises(UserError):
            MaskedLM(**bad)


def test_arch_and_loss_terms_follow_nsp():
    bert, roberta = MaskedLM(), MaskedLM(nsp=False)
    assert bert.arch.kind == "encoder" and bert.arch.segments and bert.arch.classifier == 2 and bert.arch.lm_transform
    assert not roberta.arch.segments and roberta.arch.classifier == 0 and roberta.arch.lm_transform
    assert bert.loss_terms == {"mlm_loss": "labels", "nsp_loss": "next_sentence_label"}
    assert roberta.loss_terms == {"mlm_loss": "labels"}
    assert bert.positions_needed(128) == 128


# ------------------------------------------------------------------------------------------------ masking


def clean_and_masked(obj: MaskedLM, n: int, T: int, seed: int = 0, split: TokenSplit = SPLIT, vocab: Vocab = VOCAB):
    """Clean layout, corrupted ids and labels for n sequences (drawn in batches of 256)."""
    clean, ids, labels = [], [], []
    for i in range(0, n, 256):
        g = make_generator(seed, "test", i)
        lay = obj.layout(split, vocab, g, min(256, n - i), T)
        x, y = obj.mask(lay["input_ids"], vocab, g)
        clean.append(lay["input_ids"])
        ids.append(x)
        labels.append(y)
    return torch.cat(clean), torch.cat(ids), torch.cat(labels)


def test_replacement_rates_over_100k_positions():
    clean, ids, labels = clean_and_masked(MaskedLM(nsp=False), 1400, 512)
    sel = labels != IGNORE_INDEX
    n = int(sel.sum())
    assert n >= 100_000
    n_ord = len(VOCAB.ordinary_ids)
    masked = (ids[sel] == VOCAB.mask).double().mean().item()
    random = ((ids[sel] != VOCAB.mask) & (ids[sel] != clean[sel])).double().mean().item()
    kept = (ids[sel] == clean[sel]).double().mean().item()
    p_rand = 0.1 * (1 - 1 / n_ord)  # a random draw can hit the original piece
    assert abs(masked - 0.8) < sigma5(n, 0.8)
    assert abs(random - p_rand) < sigma5(n, p_rand)
    assert abs(kept - (1 - 0.8 - p_rand)) < sigma5(n, 0.1)


def test_configurable_rates():
    obj = MaskedLM(nsp=False, mask_frac=0.5, random_frac=0.3)
    clean, ids, labels = clean_and_masked(obj, 512, 512)
    sel = labels != IGNORE_INDEX
    n = int(sel.sum())
    assert abs((ids[sel] == VOCAB.mask).double().mean().item() - 0.5) < sigma5(n, 0.5)
    assert abs((ids[sel] == clean[sel]).double().mean().item() - 0.2) < sigma5(n, 0.2)


def test_bernoulli_selected_fraction():
    clean, ids, labels = clean_and_masked(MaskedLM(nsp=False, selection="bernoulli"), 1400, 512)
    cand = ~VOCAB.special_t[clean]
    n_sel, n_cand = int((labels != IGNORE_INDEX).sum()), int(cand.sum())
    assert n_sel >= 100_000
    assert abs(n_sel / n_cand - 0.15) < sigma5(n_cand, 0.15)
    assert (labels[~cand] == IGNORE_INDEX).all()
    # a cap keeps the coin (about half the rows get fewer than 20 of their ~125 candidates) and bounds it
    count = (clean_and_masked(MaskedLM(selection="bernoulli", max_predictions=20), 512, 128)[2] != IGNORE_INDEX).sum(1)
    assert (count <= 20).all() and 0.2 < (count < 20).double().mean() < 0.8 and (count == 20).any()


@pytest.mark.parametrize("kw,T", [(dict(), 128), (dict(nsp=False), 512), (dict(max_predictions=20), 256),
                                  (dict(short_seq_prob=1.0), 64), (dict(mask_prob=0.3, nsp=False), 96)])
def test_exact_selects_the_reference_count(kw, T):
    obj = MaskedLM(**kw)
    clean, _, labels = clean_and_masked(obj, 512, T)
    n_real = (clean != VOCAB.pad).sum(1).tolist()
    cap = obj.max_predictions or 10**9
    expected = [min(cap, max(1, round(n * obj.mask_prob))) for n in n_real]  # BERT's count, [CLS]/[SEP] included
    assert (labels != IGNORE_INDEX).sum(1).tolist() == expected
    if not kw:
        assert max(expected) == 19  # 128 -> 19, as create_pretraining_data.py


def test_never_selects_specials_and_random_pieces_are_ordinary():
    # A corpus whose text contains <unk>, [MASK], <pad>-like and sentinel ids: never selected.
    tokens = SPLIT.tokens.copy()
    rng = np.random.default_rng(1)
    spots = rng.random(len(tokens)) < 0.05
    tokens[spots] = rng.choice([UNK, VOCAB.mask, VOCAB.sentinel(0), VOCAB.sentinel(99), VOCAB.eos], spots.sum())
    split = TokenSplit(tokens=tokens, doc_offsets=SPLIT.doc_offsets, sent_offsets=SPLIT.sent_offsets)
    for obj in (MaskedLM(), MaskedLM(nsp=False, selection="bernoulli"), MaskedLM(whole_word=True)):
        clean, ids, labels = clean_and_masked(obj, 512, 256, split=split)
        sel = labels != IGNORE_INDEX
        assert not VOCAB.special_t[clean][sel].any()
        assert (ids[VOCAB.special_t[clean]] == clean[VOCAB.special_t[clean]]).all()  # specials never corrupted
        replaced = sel & (ids != VOCAB.mask) & (ids != clean)
        assert replaced.sum() > 500 and not VOCAB.special_t[ids[replaced]].any()


def test_labels_and_unselected_inputs():
    clean, ids, labels = clean_and_masked(MaskedLM(), 512, 128)
    sel = labels != IGNORE_INDEX
    assert (labels[sel] == clean[sel]).all()
    assert (labels[~sel] == IGNORE_INDEX).all()
    assert (ids[~sel] == clean[~sel]).all()


def test_same_seed_same_batch():
    for obj in (MaskedLM(), MaskedLM(nsp=False, whole_word=True)):
        a = obj.batch(SPLIT, VOCAB, make_generator(7, "train", 3), 16, 128)
        b = obj.batch(SPLIT, VOCAB, make_generator(7, "train", 3), 16, 128)
        c = obj.batch(SPLIT, VOCAB, make_generator(7, "train", 4), 16, 128)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["input_ids"], c["input_ids"])
        assert all(v.dtype == torch.int64 for v in a.values())
        # batch = layout then mask with the same generator
        g = make_generator(7, "train", 3)
        lay = obj.layout(SPLIT, VOCAB, g, 16, 128)
        x, y = obj.mask(lay["input_ids"], VOCAB, g)
        assert torch.equal(x, a["input_ids"]) and torch.equal(y, a["labels"])


@pytest.mark.parametrize("selection", ["exact", "bernoulli"])
def test_whole_word_selects_whole_words(selection):
    vocab = Vocab.synthetic(1000, word_start_every=3)  # about one piece in three starts a word
    split = make_split(unique=False, vocab_size=1000)
    obj = MaskedLM(whole_word=True, selection=selection, nsp=False)
    clean, ids, labels = clean_and_masked(obj, 512, 256, split=split, vocab=vocab)
    sel = labels != IGNORE_INDEX
    cand = ~vocab.special_t[clean]
    prev_cand = torch.nn.functional.pad(cand[:, :-1], (1, 0), value=False)
    cont = cand & prev_cand & ~vocab.word_start_t[clean]  # a continuation piece of the word before it
    prev_sel = torch.nn.functional.pad(sel[:, :-1], (1, 0), value=False)
    assert (sel[cont] == prev_sel[cont]).all()  # a word's pieces are selected together
    assert (sel & cont).sum() > 1000  # ... and multi-piece words are selected (the test is not vacuous)
    start = cand & ~cont
    if selection == "bernoulli":
        n_words, n_sel = int(start.sum()), int((sel & start).sum())
        assert abs(n_sel / n_words - 0.15) < sigma5(n_words, 0.15)
    else:
        budget = torch.round((clean != vocab.pad).sum(1).double() * 0.15).long()
        count = sel.sum(1)
        assert (count <= budget).all() and count.double().mean() > 0.8 * budget.double().mean()


# ------------------------------------------------------------------------------------------------ NSP pairs


def parse_pairs(lay, T):
    """Yield (A positions, B positions, label, row) for every row, checking the layout on the way."""
    ids, tt, am = lay["input_ids"].numpy(), lay["token_type_ids"].numpy(), lay["attention_mask"].numpy()
    assert ids.shape[1] == T
    for r in range(len(ids)):
        row = ids[r]
        assert row[0] == VOCAB.cls
        seps = np.flatnonzero(row == VOCAB.sep)
        assert len(seps) == 2
        p1, p2 = seps
        n = p2 + 1
        assert (am[r, :n] == 1).all() and (am[r, n:] == 0).all() and (row[n:] == VOCAB.pad).all()
        assert (tt[r, : p1 + 1] == 0).all() and (tt[r, p1 + 1 : n] == 1).all() and (tt[r, n:] == 0).all()
        a, b = positions(row[1:p1]), positions(row[p1 + 1 : p2])
        yield a, b, int(lay["next_sentence_label"][r]), r


def test_nsp_pairs_layout_and_contiguity():
    T = 64
    obj = MaskedLM()
    lay = obj.layout(SPLIT, VOCAB, make_generator(0, "nsp"), 3000, T)
    starts = set(SPLIT.sent_offsets.tolist())
    seen = {"IsNext untruncated": 0, "NotNext": 0, "split sentence": 0}
    for a, b, label, _ in parse_pairs(lay, T):
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= T - 3
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # each segment is contiguous text
        assert DOC_OF[a[0]] == DOC_OF[a[-1]] and DOC_OF[b[0]] == DOC_OF[b[-1]]  # ... inside one document
        if label == 1:
            assert DOC_OF[b[0]] != DOC_OF[a[0]]  # NotNext: B never from A's document
            seen["NotNext"] += 1
        else:
            assert DOC_OF[b[0]] == DOC_OF[a[0]] and b[0] > a[-1]  # IsNext: B follows A in its document
            if len(a) + len(b) < T - 3:  # nothing was trimmed: B continues A exactly, A starts a sentence
                assert b[0] == a[-1] + 1 and a[0] in starts
                seen["IsNext untruncated"] += 1
                seen["split sentence"] += b[0] not in starts
    assert all(v > 50 for v in seen.values()), seen


def test_nsp_not_next_rate():
    labels = MaskedLM().layout(SPLIT, VOCAB, make_generator(1, "nsp"), 20000, 128)["next_sentence_label"]
    n = len(labels)
    assert set(labels.unique().tolist()) == {0, 1}
    assert abs(labels.double().mean().item() - 0.5) < sigma5(n, 0.5)


def test_nsp_fills_the_target_and_short_targets():
    T = 128
    full = MaskedLM(short_seq_prob=0.0).layout(SPLIT, VOCAB, make_generator(2), 2000, T)["attention_mask"].sum(1)
    short = MaskedLM(short_seq_prob=1.0).layout(SPLIT, VOCAB, make_generator(2), 2000, T)["attention_mask"].sum(1)
    assert (full <= T).all() and (full == T).float().mean() > 0.5  # most pairs fill max_len - 3 exactly
    assert short.float().mean() < 0.75 * full.float().mean()


def test_nsp_truncation_trims_from_both_ends():
    # Two one-sentence documents of 200 tokens: every pair overflows max_len - 3 = 61 and is trimmed.
    split = TokenSplit.from_documents([[[N_SPECIAL + i for i in range(k, k + 200)]] for k in (0, 200)])
    lay = MaskedLM(short_seq_prob=0.0).layout(split, VOCAB, make_generator(6), 4000, 64)
    front_b = removed_b = a_front = b_back = 0
    shapes = {(31, 30): 0, (30, 31): 0}
    for a, b, label, _ in parse_pairs(lay, 64):
        assert len(a) + len(b) == 61
        if (len(a), len(b)) in shapes:
            shapes[len(a), len(b)] += 1
        doc_a, doc_b = a[0] // 200 * 200, b[0] // 200 * 200
        a_front += a[0] > doc_a
        if label == 1:  # B was the whole other document: its front cut ~ Binomial(removed, 0.5)
            front_b += b[0] - doc_b
            removed_b += 200 - len(b)
        else:
            b_back += b[-1] < doc_b + 199
    assert abs(front_b - removed_b / 2) < 5 * math.sqrt(removed_b / 4)
    assert a_front > 100 and b_back > 100
    assert shapes[31, 30] > 10 * max(shapes[30, 31], 1)  # both long: trimmed to balance, ties cut from B


def test_nsp_edge_corpora():
    # one document: B comes from it (the only choice) and nothing breaks; tiny documents and sentences
    one = TokenSplit.from_documents([[[N_SPECIAL + i for i in range(5 * s, 5 * s + 5)] for s in range(30)]])
    tiny = TokenSplit.from_documents([[[200]], [[201, 202]], [[203], [204]], [[205 + i] for i in range(40)]])
    vocab = Vocab.synthetic(1000)
    for split in (one, tiny):
        lay = MaskedLM(short_seq_prob=0.5).layout(split, vocab, make_generator(3), 500, 16)
        ids = lay["input_ids"]
        assert ((ids == vocab.sep).sum(1) == 2).all() and (lay["attention_mask"].sum(1) <= 16).all()
        a_len = (ids == vocab.sep).int().argmax(1) - 1
        n = lay["attention_mask"].sum(1)
        assert (a_len >= 1).all() and (n - a_len - 3 >= 1).all()
    doc = np.searchsorted(tiny.doc_offsets, np.arange(tiny.n_tokens), side="right") - 1
    lay = MaskedLM().layout(tiny, vocab, make_generator(4), 2000, 16)
    for r in range(2000):
        row = lay["input_ids"][r].numpy()
        p1, p2 = np.flatnonzero(row == vocab.sep)
        a, b = row[1:p1] - 200, row[p1 + 1 : p2] - 200
        if lay["next_sentence_label"][r] == 1:
            assert doc[a[0]] != doc[b[0]]
        else:
            assert doc[a[0]] == doc[b[0]] and b[0] == a[-1] + 1


# ------------------------------------------------------------------------------------------------ RoBERTa


def test_full_sentences_packing():
    T = 128
    lay = MaskedLM(nsp=False).layout(SPLIT, VOCAB, make_generator(5), 2000, T)
    assert set(lay) == {"input_ids", "attention_mask"}
    ids, am = lay["input_ids"].numpy(), lay["attention_mask"].numpy()
    sent_end = set(SPLIT.sent_offsets.tolist())
    doc_off = SPLIT.doc_offsets
    cut = 0
    for r in range(len(ids)):
        n = int(am[r].sum())
        row = ids[r]
        assert row[0] == VOCAB.bos and row[n - 1] == VOCAB.eos and (row[n:] == VOCAB.pad).all()
        assert (am[r, :n] == 1).all()
        content = row[1 : n - 1]
        pieces = np.split(content, np.flatnonzero(content == VOCAB.eos))
        pieces = [positions(p[p != VOCAB.eos]) for p in pieces]
        assert all(len(p) for p in pieces)
        for i, p in enumerate(pieces):
            assert (np.diff(p) == 1).all() and DOC_OF[p[0]] == DOC_OF[p[-1]]
            if i > 0:  # a new document starts right after the previous one ended
                assert p[0] == doc_off[DOC_OF[p[0]]] and pieces[i - 1][-1] + 1 == doc_off[DOC_OF[p[0]]]
        first, last = pieces[0][0], pieces[-1][-1]
        assert first in sent_end  # starts at a sentence start
        if last + 1 in sent_end:  # ends at a sentence end, and the next sentence would not have fit
            nxt = np.searchsorted(SPLIT.sent_offsets, last + 1) + 1
            if nxt < len(SPLIT.sent_offsets):
                extra = SPLIT.sent_offsets[nxt] - (last + 1) + (last + 1 in set(doc_off.tolist()))
                assert len(content) + extra > T - 2
        else:  # a first sentence longer than the budget is cut
            assert len(pieces) == 1 and len(content) == T - 2
            cut += 1
    assert cut > 0


# ------------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("nsp", [True, False])
def test_loss_counts_and_gradients(nsp):
    from models.config import ModelConfig
    from models.transformer import Transformer

    torch.manual_seed(0)
    vocab = Vocab.synthetic(500)
    split = make_split(unique=False, vocab_size=500, n_sents=300)
    obj = MaskedLM(nsp=nsp)
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, max_len=64, norm_placement="post", embed_norm=True)
    model = Transformer(cfg, obj.arch, vocab.size)
    batch = obj.batch(split, vocab, make_generator(0), 6, 64)
    terms = obj.loss(model, batch)
    n_sel = int((batch["labels"] != IGNORE_INDEX).sum())
    assert int(terms["mlm_loss"][1]) == n_sel == int(terms["mlm_acc"][1])
    # the masked projection gives the same loss as scoring every position
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch.get("token_type_ids")).logits  # (B, T, V)
    ref = torch.nn.functional.cross_entropy(full.reshape(-1, vocab.size), batch["labels"].reshape(-1), reduction="sum")
    assert torch.allclose(terms["mlm_loss"][0], ref, rtol=1e-4)
    if nsp:
        assert int(terms["nsp_loss"][1]) == 6 and set(terms) >= {"nsp_loss", "nsp_acc", "mlm_acc"}
    else:
        assert "nsp_loss" not in terms
    sum(v[0] for k, v in terms.items() if k.endswith("_loss")).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    if nsp:  # the classifier and the segment embeddings receive gradient
        assert any(("cls" in n or "classif" in n or "pool" in n) and g is not None and g.abs().sum() > 0
                   for n, g in grads.items())
        assert any(("type" in n or "segment" in n) and g is not None and g.abs().sum() > 0 for n, g in grads.items())


def test_baseline_majority_accuracy():
    split = TokenSplit.from_documents([[[200, 200, 201], [UNK, UNK, UNK, UNK]], [[200, 202]]])
    assert MaskedLM().baseline(split, Vocab.synthetic(300)) == {"majority_acc": 3 / 5}


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("recipe", ["bert", "roberta", "bert-tiny", "roberta-tiny"])
def test_recipes_build(recipe):
    from pretrain.config import config_from_dict
    from pretrain.recipes import read_recipe

    raw = read_recipe(recipe)
    assert raw.get("description")
    cfg = config_from_dict(raw, recipe)
    assert isinstance(cfg.objective, MaskedLM)
    assert cfg.objective.nsp == recipe.startswith("bert")
    assert cfg.objective.positions_needed(cfg.data.seq_len) <= cfg.model.max_len
