"""Sentencepiece training and loading: fixed specials, byte fallback, exact round trip, clear errors."""

import io
import pickle
import random

import numpy as np
import pytest

from pretrain.errors import UserError
from pretrain.tokenizer import N_SPECIAL, NEWLINE, SPECIAL_PIECES, Tokenizer, train_tokenizer

EXTRA = ["café", "naïve", "Zürich", "东京", "日本語", "😀", "🎉", "[MASK]", "<pad>", "<s>"]


def make_texts(n_docs: int = 120, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with some accents, CJK, emoji and literal special strings."""
    rng = random.Random(seed)
    syllables = ["ta", "ko", "ri", "men", "sol", "ex", "an", "der", "pro", "ver", "lin", "qu", "est", "ion"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    words += ["the", "of", "and", "a", "to", "in", "is", "that", "it", "for"] * 10 + EXTRA
    docs = []
    for _ in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 3)):
            sents = []
            for _ in range(rng.randint(1, 4)):
                s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                sents.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]))
            paras.append(" ".join(sents))
        docs.append("\n\n".join(paras))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(make_texts(), tmp_path_factory.mktemp("tok") / "t", 500, "unigram")
    return Tokenizer.load(path)


SAMPLES = [
    "Déjà vu: naïve café in Zürich, ñandú, Ærøskøbing.",
    "東京は日本の首都です。中文句子！한국어 문장.",
    "Emoji 😀🎉👍🏽 and flags 🇯🇵, math ∑∫√ and arrows →.",
    "Literal specials stay text: [MASK] <pad> <s> </s> [CLS] [SEP] <unk> <extra_id_0>.",
    "  leading spaces,\ttabs,  double  spaces,\n\nnew lines\nand trailing  \n",
    "Rare: \u200b zero width, \ufeff BOM, e\u0301 combining, ﬁ ligature, ＡＢ full width, \x01 control.",
]


def test_specials_have_fixed_ids_and_are_control_pieces(tok):
    assert [tok.id_to_piece(i) for i in range(N_SPECIAL)] == SPECIAL_PIECES
    assert tok.piece_to_id("[MASK]") == 6 and tok.piece_to_id("<extra_id_99>") == 106
    assert tok.id_to_piece(N_SPECIAL) == NEWLINE
    assert tok.id_to_piece(N_SPECIAL + 1) == "<0x00>"  # byte fallback pieces follow
    assert tok.size == 500


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact_and_never_produces_special_ids(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) >= N_SPECIAL  # "[MASK]" and "<pad>" in text are spelled with ordinary pieces
    assert tok.encode_batch([text, text], num_threads=2) == [ids, ids]


def test_documented_normalization_exception(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # sentencepiece's own space mark decodes as a space


def test_decode_skips_or_shows_specials(tok):
    ids = tok.encode("hello world")
    assert tok.decode([2, 6, *ids, 3]) == "hello world"
    assert tok.decode([6, *ids, 7], keep_special=True) == "[MASK]hello world<extra_id_0>"


def test_vocab_arrays(tok):
    v = tok.vocab
    assert v.size == tok.size and v.special.sum() == N_SPECIAL and v.special[:N_SPECIAL].all()
    pieces = [tok.id_to_piece(i) for i in range(tok.size)]
    assert (v.word_start == np.array([p.startswith("▁") for p in pieces])).all()
    assert (v.piece_bytes[:N_SPECIAL] == 0).all() and v.piece_bytes[N_SPECIAL] == 1  # "\n"
    assert (v.piece_bytes[N_SPECIAL + 1:N_SPECIAL + 257] == 1).all()  # byte pieces
    i = next(i for i, p in enumerate(pieces) if i > N_SPECIAL + 256 and p.startswith("▁") and len(p) > 2)
    assert v.piece_bytes[i] == len(pieces[i].encode()) - 2  # "▁" is 3 UTF-8 bytes but stands for 1 space
    # Summed piece bytes of an encoding equal the text's UTF-8 length (what bits-per-byte relies on).
    text = SAMPLES[0] + SAMPLES[2]
    assert v.piece_bytes[tok.encode(text)].sum() == len(text.encode())


def test_training_is_deterministic_and_bpe_works(tmp_path):
    texts = make_texts(60, seed=1)
    a = train_tokenizer(texts, tmp_path / "a", 450, "bpe").read_bytes()
    b = train_tokenizer(texts, tmp_path / "b", 450, "bpe").read_bytes()
    assert a == b
    t = Tokenizer.load(tmp_path / "a.model")
    assert (tmp_path / "a.vocab").read_text().count("\n") == 450
    for s in SAMPLES:
        assert t.decode(t.encode(s)) == s


def test_pickle_round_trip(tok):
    t2 = pickle.loads(pickle.dumps(tok))
    assert t2.encode(SAMPLES[1]) == tok.encode(SAMPLES[1]) and t2.sha256 == tok.sha256


def test_vocab_too_large_for_the_corpus(tmp_path):
    with pytest.raises(UserError, match=r"vocabulary size 5000 is too large.*--set data.vocab_size=\d+"):
        train_tokenizer(make_texts(20), tmp_path / "t", 5000, "unigram")
    assert not list(tmp_path.iterdir())  # nothing written


def test_soft_vocab_limit_takes_the_largest_the_corpus_supports(tmp_path):
    with pytest.raises(UserError) as e:
        train_tokenizer(make_texts(20), tmp_path / "hard", 5000, "unigram")
    most = int(e.value.args[0].rsplit("=", 1)[1])
    path = train_tokenizer(make_texts(20), tmp_path / "soft", 5000, "unigram", soft_limit=True)
    assert Tokenizer.load(path).size == most < 5000


def test_vocab_too_small_for_the_characters(tmp_path):
    many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 50)) for k in range(0, 1000, 50)]
    with pytest.raises(UserError, match=r"vocabulary size 400 is too small.*--set data.vocab_size=\d+"):
        train_tokenizer(many_chars, tmp_path / "t", 400, "unigram")


def test_load_rejects_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "x.model").write_text("hello, I am text")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "x.model")
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")


def test_load_names_missing_and_misplaced_specials(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()  # sentencepiece's defaults: <unk>=0 <s>=1 </s>=2, no pad/[MASK]/sentinels
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_texts(40)), model_writer=model, vocab_size=200,
                                   minloglevel=2)
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    with pytest.raises(UserError) as e:
        Tokenizer.load(tmp_path / "plain.model")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("missing: <pad>, [CLS], [SEP], [MASK], <extra_id_0..99>", "<unk> (id 0, needs 1)",
                 "</s> (id 2, needs 3)", "pretrain tokenizer train"):
        assert name in msg


def test_extra_special_pieces_follow_the_fixed_ones(tmp_path, tok):
    """An objective's own pieces (UL2's mode tokens, say) become control pieces right after the fixed ones;
    everything that asks "is this special?" counts them, and the fixed ids do not move."""
    extra = ("[NLU]", "[NLG]", "[S2S]")
    t = Tokenizer.load(train_tokenizer(make_texts(), tmp_path / "x", 500, "unigram", extra_pieces=extra), extra)
    assert [t.id_to_piece(i) for i in range(N_SPECIAL)] == SPECIAL_PIECES
    assert t.specials == (*SPECIAL_PIECES, *extra) and t.id_to_piece(N_SPECIAL + 3) == NEWLINE
    v = t.vocab
    assert v.n_special == N_SPECIAL + 3 and v.special.sum() == v.n_special and v.special[: v.n_special].all()
    assert [v.special_id(p) for p in extra] == [N_SPECIAL, N_SPECIAL + 1, N_SPECIAL + 2]
    assert (v.piece_bytes[: v.n_special] == 0).all()
    ids = t.encode("[NLU] stays text")
    assert min(ids) >= v.n_special and t.decode(ids) == "[NLU] stays text"
    assert t.decode([N_SPECIAL + 1, *t.encode("hi")]) == "hi"
    assert t.decode([N_SPECIAL + 1, *t.encode("hi")], keep_special=True) == "[NLG]hi"
    assert tok.vocab.n_special == N_SPECIAL  # a tokenizer without extras has only the fixed ones
    with pytest.raises(UserError, match=r"lacks the special pieces \[NLU\]"):
        Tokenizer.load(tok.path, ("[NLU]",))
    with pytest.raises(UserError, match="no special piece"):
        tok.vocab.special_id("[NLU]")
    for bad in (("[MASK]",), ("a b",), ("[X]", "[X]"), ("",)):
        with pytest.raises(UserError, match="extra special piece"):
            train_tokenizer(make_texts(20), tmp_path / "bad", 450, "unigram", extra_pieces=bad)


def test_tokenizer_trains_on_a_seeded_uniform_sample_of_the_stream(tmp_path, monkeypatch):
    """Reservoir sampling by random keys: at most k sentences, uniform over the stream, in stream order, the
    same for any worker count; the whole stream (in order) when it is shorter than k; recorded in .meta."""
    from pretrain import stream
    from pretrain.config import DataConfig
    from pretrain.sample import sample_sentences, train_for_source

    lines = [f"Sentence number {i} of the stream." for i in range(4000)]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)  # ~40 chunks
    source = stream.resolve_source(DataConfig(source=str(tmp_path / "c.txt"), doc_per="line"))

    def sample(k, workers=1):
        cfg = DataConfig(source=str(tmp_path / "c.txt"), doc_per="line", tokenizer_sample=k)
        return sample_sentences(source, cfg, workers, lambda *a: None)

    got, info = sample(1000)
    assert len(got) == 1000 and len(set(got)) == 1000 and info["sentences"] == 4000 and info["sampled"] == 1000
    index = np.array([lines.index(s) for s in got])
    assert (np.diff(index) > 0).all()  # in stream order
    assert 450 <= (index < 2000).sum() <= 550  # uniform: half from each half (hypergeometric sd ~14)
    assert sample(1000)[0] == got and sample(1000, workers=2)[0] == got  # seeded; worker count is irrelevant
    assert sample(10_000)[0] == lines  # a short stream: every sentence, in order
    cfg = DataConfig(source=str(tmp_path / "c.txt"), doc_per="line", tokenizer_sample=1500)
    path, _ = train_for_source(source, cfg, tmp_path / "tok", 420, "unigram", seed=1234, soft_limit=True,
                               extra_pieces=(), workers=1, on_chunk=lambda *a: None)
    tok = Tokenizer.load(path)
    assert tok.meta["sample"]["sampled"] == 1500 and tok.meta["sample"]["sentences"] == 4000
    assert tok.meta["sha256"] == tok.sha256 and tok.meta["source"]["fingerprint"] == source.fingerprint
