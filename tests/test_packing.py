"""Packed rows: several examples share a row, each computes what it would alone (the model's block-diagonal
attention, restarted positions, a classifier per example), and packing selects nothing, so the objective's
statistics are the unpacked ones (BERT's NSP pairs here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_mlm import SPLIT, VOCAB, make_split

from models.config import Arch, ModelConfig
from models.transformer import Transformer
from objectives.base import IGNORE_INDEX, make_generator
from objectives.mlm import MaskedLM, _pairs_for_rows, _sentence_pairs
from objectives.packing import FirstFit
from pretrain.tokenizer import N_SPECIAL, Vocab

PACKED = MaskedLM(pack=True)


def examples(b: dict, i: int) -> list[tuple[slice, int]]:
    """(span, example number) of each packed example of row i."""
    ex = b["example_ids"][i].tolist()
    out, start = [], 0
    for j in range(1, len(ex) + 1):
        if j == len(ex) or ex[j] != ex[start]:
            if ex[start] > 0:
                out.append((slice(start, j), ex[start]))
            start = j
    return out


def first_fit(lengths: np.ndarray, rows: int, width: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """`FirstFit` in one round: rows, offsets, and whether an example fitted nowhere."""
    packer = FirstFit(rows, width)
    full = packer.add(lengths)
    return (*packer.placed(), full)


def test_first_fit_keeps_a_prefix_and_fills_tails():
    lengths = np.array([50, 60, 30, 100, 20, 20, 90, 10])
    row, off, full = first_fit(lengths, 3, 128)
    # 30 opens row 1 and 100 row 2; the two 20s then fill row 1's tail (next-fit would have put them after 100
    # and stopped there); 90 fits nowhere and ends the batch, so 10, though it would fit, is not taken.
    assert row.tolist() == [0, 0, 1, 2, 1, 1] and off.tolist() == [0, 50, 0, 0, 30, 50] and full
    used = np.bincount(row, weights=lengths[: len(row)], minlength=3)
    assert (used <= 128).all()
    row, off, full = first_fit(np.array([10, 10]), 3, 128)
    assert row.tolist() == [0, 0] and not full  # two short examples cannot fill three rows: the caller draws more


def test_packed_rows_hold_whole_pairs_with_their_own_segments():
    b = PACKED.batch(SPLIT, VOCAB, make_generator(0), 16, 128)
    assert b["input_ids"].shape == (16, 128) and b["next_sentence_label"].shape[0] == 16
    for i in range(16):
        spans = examples(b, i)
        assert [e for _, e in spans] == list(range(1, len(spans) + 1))  # contiguous, numbered in order
        labels = b["next_sentence_label"][i].tolist()
        assert all(x in (0, 1) for x in labels[:len(spans)]) and all(x == IGNORE_INDEX for x in labels[len(spans):])
        for span, _ in spans:
            x, t = b["input_ids"][i, span], b["token_type_ids"][i, span]
            seps = (x == VOCAB.sep).nonzero().flatten().tolist()
            assert x[0] == VOCAB.cls and len(seps) >= 2 and seps[-1] == len(x) - 1  # [CLS] A [SEP] B [SEP]
            assert (t[: seps[0] + 1] == 0).all() and (t[seps[0] + 1:] == 1).all()  # types restart per pair
    real = float((b["example_ids"] > 0).float().mean())
    assert real > 0.9, real  # the unpacked pairs of this corpus fill about two thirds of their rows


def test_packing_selects_nothing_the_pairs_are_the_drawn_prefix():
    """The packed pairs are the first pairs drawn from the same generator (BERT's pairs, in rounds until the rows
    are full), each where first-fit put it: packing keeps every one until then, long or short, IsNext or
    NotNext."""
    gen_a, gen_b = make_generator(3), make_generator(3)
    b = PACKED.batch(SPLIT, VOCAB, gen_a, 8, 128)
    spans, row, off = _pairs_for_rows(SPLIT, gen_b, 8, 128, PACKED.short_seq_prob)
    tok = torch.from_numpy(SPLIT.tokens.astype(np.int64))

    def drawn(k: int) -> torch.Tensor:  # pair k as BERT writes it: [CLS] A [SEP] B [SEP]
        a0, la, b0, lb = (int(spans[f][k]) for f in ("a0", "la", "b0", "lb"))
        cls, sep = torch.tensor([VOCAB.cls]), torch.tensor([VOCAB.sep])
        return torch.cat([cls, tok[a0:a0 + la], sep, tok[b0:b0 + lb], sep])

    first = _sentence_pairs(SPLIT, VOCAB, make_generator(3), 16, 128, PACKED.short_seq_prob)
    for k in range(16):  # round one: BERT's pairs as drawn
        n = int(first["attention_mask"][k].sum())
        assert torch.equal(drawn(k), first["input_ids"][k, :n])
    assert sum(len(examples(b, i)) for i in range(8)) == len(row) >= 8  # every placed pair, no other
    for k in range(len(row)):  # drawn pair k sits where first-fit put it, masks undone
        i, x = int(row[k]), drawn(k)
        [(span, e)] = [(sp, e) for sp, e in examples(b, i) if sp.start == off[k]]
        original = torch.where(b["labels"][i, span] != IGNORE_INDEX, b["labels"][i, span], b["input_ids"][i, span])
        assert span.stop - span.start == len(x) and torch.equal(original, x)
        assert b["next_sentence_label"][i, e - 1] == int(spans["not_next"][k])


def test_packed_statistics_are_berts():
    """NotNext at 50% and BERT's exact masked count per pair (round(n x 0.15), n counting [CLS]/[SEP])."""
    split = make_split(seed=2)
    vocab = Vocab.synthetic(N_SPECIAL + split.n_tokens)
    labels, n_pairs = [], 0
    for s in range(40):
        b = PACKED.batch(split, vocab, make_generator(s), 16, 128)
        lab = b["next_sentence_label"]
        labels += lab[lab != IGNORE_INDEX].tolist()
        for i in range(16):
            for span, _ in examples(b, i):
                n = span.stop - span.start
                assert int((b["labels"][i, span] != IGNORE_INDEX).sum()) == max(1, round(n * 0.15))
                n_pairs += 1
    rate = float(np.mean(labels))
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / len(labels)), (rate, len(labels))
    assert n_pairs == len(labels) > 500


@pytest.mark.parametrize("kw", [dict(whole_word=True), dict(selection="bernoulli", max_predictions=8),
                                dict(max_predictions=6)])
def test_packed_masking_budgets_each_pair_apart(kw):
    """Masking works on the packed rows, each pair with its own budget and its own random order: whole words stay
    whole within their pair, a cap holds per pair, and every candidate of a pair is as likely to be chosen
    (the first and the last of each pair as often as the rest), so no pair borrows from or lends to another."""
    vocab = Vocab.synthetic(1000, word_start_every=3)
    split = make_split(unique=False, vocab_size=1000)
    obj = MaskedLM(pack=True, **kw)
    first, last, taken, cands, n_pairs = 0, 0, 0, 0, 0
    for s in range(30):
        b = obj.batch(split, vocab, make_generator(s), 16, 128)
        clean = torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"])
        for i in range(16):
            for span, _ in examples(b, i):
                x, sel = clean[i, span], b["labels"][i, span] != IGNORE_INDEX
                cand = ~vocab.special_t[x]
                n, k = span.stop - span.start, int(sel.sum())
                if kw.get("whole_word"):
                    cont = cand & torch.nn.functional.pad(cand[:-1], (1, 0)) & ~vocab.word_start_t[x]
                    assert (sel[cont] == torch.nn.functional.pad(sel[:-1], (1, 0))[cont]).all()
                    assert k <= max(1, round(n * 0.15))
                else:
                    assert k <= obj.max_predictions
                    if obj.selection == "exact":
                        assert k == min(obj.max_predictions, max(1, round(n * 0.15)))
                    c = cand.nonzero().flatten()
                    first, last = first + int(sel[c[0]]), last + int(sel[c[-1]])
                taken, cands, n_pairs = taken + k, cands + int(cand.sum()), n_pairs + 1
    assert n_pairs > 300 and taken > 0
    if not kw.get("whole_word"):
        rate = taken / cands  # every candidate is chosen at this rate, the edges of a pair too
        for edge in (first, last):
            assert abs(edge / n_pairs - rate) < 5 * math.sqrt(rate * (1 - rate) / n_pairs), (edge, n_pairs, rate)


def test_a_packed_classifier_scores_each_example_as_alone():
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_ff=64, max_len=64, norm_placement="post",
                      embed_norm=True)
    torch.manual_seed(0)
    model = Transformer(cfg, Arch(kind="encoder", segments=True, lm_transform=True, classifier=2), 600).eval()
    g = torch.Generator().manual_seed(1)
    parts = [torch.randint(110, 600, (1, n), generator=g) for n in (11, 20, 7)]
    types = [torch.cat([torch.zeros(1, n // 2), torch.ones(1, n - n // 2)], 1).long() for n in (11, 20, 7)]
    ex = torch.cat([torch.full((1, p.size(1)), i + 1) for i, p in enumerate(parts)] + [torch.zeros(1, 5)], 1).long()
    row, tt = torch.cat([*parts, torch.zeros(1, 5, dtype=torch.long)], 1), torch.cat([*types, torch.zeros(1, 5)], 1)
    with torch.no_grad():
        packed = model(row, token_type_ids=tt.long(), example_ids=ex).cls_logits  # (1, 3, 2)
        for i, (p, t) in enumerate(zip(parts, types, strict=True)):
            alone = model(p, token_type_ids=t).cls_logits  # (1, 2)
            assert (packed[0, i] - alone[0]).abs().max() < 1e-5, i


def test_pack_needs_nsp():
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="pack"):
        MaskedLM(pack=True, nsp=False)


# ------------------------------------------------------------------------------------- BART's packed blocks
def test_packed_blocks_are_the_drawn_prefix_then_one_tail_block_per_row():
    """BART's packed rows (objectives/sentences.py): the blocks first-fit placed are the first ones drawn, each the
    block it is alone; then every row with TAIL_ROOM or more content tokens left gets one block drawn for that
    room. So rows of blocks that run across documents fill fuller than with one block each."""
    from objectives.base import computed_positions
    from objectives.denoise import Denoising
    from objectives.sentences import TAIL_ROOM, block_spans, packed

    B, T = 32, 128
    gen, replay = make_generator(0, "blocks"), make_generator(0, "blocks")
    blocks = packed(SPLIT, VOCAB, gen, B, T, cross=True)
    packer, starts = FirstFit(B, T), []
    while True:  # the same draws, placed by the same first-fit
        s = torch.randint(0, SPLIT.n_sents, (2 * B,), generator=replay).numpy()
        starts.append(s)
        if packer.add(block_spans(SPLIT, s, T - 2, True)[1] + 2):
            break
    row, off = packer.placed()
    a, n, _ = block_spans(SPLIT, np.concatenate(starts)[: len(row)], T - 2, True)
    got = {(r, o): (int(blocks.ids[r, o + 1]), int(blocks.n[r, e]))
           for r in range(B) for e, o in enumerate(blocks.first[r].tolist()) if blocks.n[r, e] > 0}
    assert {(int(r), int(o)): (int(SPLIT.tokens[x]), int(k)) for r, o, x, k in zip(row, off, a, n, strict=True)} \
        .items() <= got.items()
    tails = [r for r in range(B) if T - 2 - packer.used[r] >= TAIL_ROOM]
    assert len(got) == len(row) + len(tails) and len(tails) >= B // 4
    for r in tails:  # the row's last block starts where first-fit left off, and fits the room it was drawn for
        k = int((blocks.n[r] > 0).sum()) - 1
        assert int(blocks.first[r, k]) == packer.used[r] and 1 <= int(blocks.n[r, k]) <= T - 2 - packer.used[r]
    fill = {}
    for p in (False, True):
        real, positions = zip(*(computed_positions(Denoising(pack=p).batch(SPLIT, VOCAB, make_generator(i), B, T))
                                for i in range(4)), strict=True)
        fill[p] = sum(real) / sum(positions)
    assert fill[True] > 0.95 and fill[True] > fill[False] + 0.03, fill  # here 96% against 91%


@pytest.mark.parametrize("name", ["mlm", "denoise", "prefix"])
def test_packed_rows_accumulate_row_by_row(name):
    """A packed batch's rows are independent: SGD on the whole batch equals SGD on its rows in micro-batches."""
    from objectives import OBJECTIVES
    from pretrain.config import TrainConfig
    from pretrain.metrics import Meter
    from pretrain.optim import build_optimizer
    from pretrain.runtime import Engine, Runtime
    from pretrain.trainer import train_step

    obj = OBJECTIVES[name](pack=True)
    vocab = Vocab.synthetic(1000, word_start_every=2)
    split = make_split(seed=1, max_doc=2, unique=False, vocab_size=1000)  # short documents: short NSP pairs
    full = obj.batch(split, vocab, make_generator(0), 16, 128)
    assert int(full["example_ids"].max()) > 1
    tc = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip=0.0)
    params = []
    for micro in ([full], [{k: v[i: i + 4] for k, v in full.items()} for i in range(0, 16, 4)]):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layers=1, n_heads=2, d_model=32, d_ff=64, max_len=128, dropout=0.0)
        model = Transformer(cfg, obj.arch, vocab.size)
        engine = Engine(Runtime(torch.device("cpu"), None), model, model,
                        build_optimizer(model, tc, torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False))
        train_step(obj, engine, micro, tc, Meter())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (params[0] - params[1]).abs().max().item() < 1e-6
