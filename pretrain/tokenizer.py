"""Sentencepiece tokenizer: training, loading, and the special-token ids every objective needs.

Kudo & Richardson 2018, "SentencePiece: a simple and language independent subword tokenizer" (unigram
LM tokenization: Kudo 2018; BPE: Sennrich et al. 2016). One tokenizer serves every objective, with fixed ids:
    0 <pad>   1 <unk>   2 <s>   3 </s>   4 [CLS]   5 [SEP]   6 [MASK]   7..106 <extra_id_0>..<extra_id_99>
then the extra special pieces an objective declares (`Objective.special_pieces`, e.g. UL2's mode tokens), in
the order given, then "\n" (a user-defined piece, so line breaks are one token), then the 256 byte pieces
<0x00>..<0xFF>, then the learned pieces. So ids [0, `Vocab.n_special`) are exactly the special pieces.
The specials are sentencepiece *control* pieces: they are never produced from text, so a literal
"[MASK]" or "<pad>" in a document stays text.

Normalization, chosen so that text round-trips: `decode(encode(text)) == text` for every string, with one
documented exception. The rule is "identity" (no NFKC: "ﬁ" stays "ﬁ", full-width forms stay), whitespace is
kept as is (no stripping or collapsing of runs of spaces), and no dummy "▁" is prefixed, so pieces of a text
concatenate exactly; byte fallback means no character is ever `<unk>`. The exception: the character U+2581
"▁" (sentencepiece's own whitespace mark) decodes as a space. A consequence of "no dummy prefix": the first
word of a document has no leading "▁" (it is encoded like a word glued to what precedes it), so
`Vocab.word_start` is False there; objectives that need word starts may treat each document's first token
as one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

PAD, UNK, BOS, EOS, CLS, SEP, MASK = range(7)
N_SENTINELS = 100
SENTINEL0 = 7  # <extra_id_k> has id SENTINEL0 + k
SPECIAL_PIECES = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"] + [
    f"<extra_id_{k}>" for k in range(N_SENTINELS)
]
N_SPECIAL = len(SPECIAL_PIECES)  # the fixed special pieces; a tokenizer may add extra ones after them
NEWLINE = "\n"  # a user-defined piece, right after the special pieces: a line break is one token
TRAIN_THREADS = 4  # fixed, not os.cpu_count(): sentencepiece's result depends on its thread count
CHARACTER_COVERAGE = 0.9995  # rarer characters are spelled with byte pieces (byte fallback)
MIN_VOCAB_SIZE = 400  # the fixed specials, "\n", 256 bytes and a few dozen learned pieces
MAX_SENTENCE_BYTES = 1 << 14  # longer training sentences are skipped by the trainer (16 KiB; default 4 KiB)


@dataclass(frozen=True, eq=False)
class Vocab:
    """What objectives need to know about the vocabulary, without sentencepiece.

    Arrays have one entry per id (length `size`). Build one from a tokenizer (`Tokenizer.vocab`) or by
    hand in tests (`Vocab.synthetic`).
    """

    size: int
    special: np.ndarray  # (V,) bool: the special pieces, fixed and extra (never corrupted or drawn)
    word_start: np.ndarray  # (V,) bool: the piece begins a word (starts with the "▁" boundary mark)
    piece_bytes: np.ndarray  # (V,) int64: UTF-8 bytes the piece stands for (▁ counts 1, byte pieces 1, specials 0)
    pad: int = PAD
    unk: int = UNK
    bos: int = BOS
    eos: int = EOS
    cls: int = CLS
    sep: int = SEP
    mask: int = MASK
    specials: tuple[str, ...] = tuple(SPECIAL_PIECES)  # the special pieces, in id order: fixed, then extra

    @property
    def n_special(self) -> int:
        """Number of special pieces: ids below it are special."""
        return len(self.specials)

    def sentinel(self, k: int) -> int:
        """Id of <extra_id_k>."""
        return SENTINEL0 + k

    def special_id(self, piece: str) -> int:
        """Id of a special piece (fixed or extra, e.g. an objective's mode token); UserError if absent."""
        if piece not in self.specials:
            raise UserError(f"the tokenizer has no special piece {piece!r}; train a new one (leave data.tokenizer "
                            "empty) so that the objective's pieces are added")
        return self.specials.index(piece)

    @cached_property
    def ordinary_ids(self) -> torch.Tensor:
        """(n,) int64 ids that random replacement may draw: every non-special piece."""
        import torch

        return torch.from_numpy(np.flatnonzero(~self.special)).long()

    @cached_property
    def special_t(self) -> torch.Tensor:
        """`special` as a torch bool tensor."""
        import torch

        return torch.from_numpy(self.special.copy())

    @cached_property
    def word_start_t(self) -> torch.Tensor:
        """`word_start` as a torch bool tensor."""
        import torch

        return torch.from_numpy(self.word_start.copy())

    @cached_property
    def piece_bytes_t(self) -> torch.Tensor:
        """`piece_bytes` as a torch int64 tensor."""
        import torch

        return torch.from_numpy(self.piece_bytes.astype(np.int64))

    @classmethod
    def synthetic(cls, size: int = 1000, word_start_every: int = 1, extra: tuple[str, ...] = ()) -> Vocab:
        """A vocabulary for tests: the fixed specials, the `extra` special pieces, then ordinary pieces; every
        `word_start_every`-th ordinary id starts a word (1 = all of them)."""
        specials = (*SPECIAL_PIECES, *extra)
        special = np.arange(size) < len(specials)
        ids = np.arange(size)
        word_start = (~special) & ((ids - len(specials)) % word_start_every == 0)
        piece_bytes = np.where(special, 0, 3).astype(np.int64)
        return cls(size=size, special=special, word_start=word_start, piece_bytes=piece_bytes, specials=specials)


def check_extra_pieces(pieces: tuple[str, ...]) -> None:
    """UserError unless `pieces` are distinct non-empty strings without whitespace, none a fixed special."""
    for p in pieces:
        if not p or any(c.isspace() for c in p) or p in SPECIAL_PIECES or pieces.count(p) > 1:
            raise UserError(f"extra special piece {p!r} must be a non-empty string without whitespace, given once, "
                            "and none of the fixed special pieces")


def _trainer_options(vocab_size: int, model_type: str, character_coverage: float,
                     extra_pieces: tuple[str, ...] = (), n_texts: int = 0) -> dict:
    """Sentencepiece trainer options: the fixed specials (then `extra_pieces`), byte fallback and the
    round-trip normalization."""
    return dict(
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        pad_piece=SPECIAL_PIECES[PAD], unk_piece=SPECIAL_PIECES[UNK],
        bos_piece=SPECIAL_PIECES[BOS], eos_piece=SPECIAL_PIECES[EOS],
        control_symbols=[*SPECIAL_PIECES[CLS:], *extra_pieces],  # in this order, right after the four above
        user_defined_symbols=[NEWLINE],  # matched in text: a line break is one piece, not a byte piece
        byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # runs of spaces (indentation) may become one piece
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=max(2_000_000, n_texts), shuffle_input_sentence=True,  # (prepare samples beforehand)
        num_threads=TRAIN_THREADS, minloglevel=2,  # 2 = errors only: no log spam on stderr
    )


def train_tokenizer(texts: Iterable[str], out_prefix: Path | str, vocab_size: int,
                    model_type: Literal["unigram", "bpe"] = "unigram", *, seed: int = 1234,
                    character_coverage: float = CHARACTER_COVERAGE, soft_limit: bool = False,
                    extra_pieces: tuple[str, ...] = (), meta: dict | None = None) -> Path:
    """Train a sentencepiece model on `texts` (one sentence or document each) and write `<out_prefix>.model`
    (and a human-readable `<out_prefix>.vocab`: JSON-escaped piece, tab, score per line; with `meta`, the
    metadata `<out_prefix>.json`, which `Tokenizer.load` reads back as `.meta`). Returns the .model path.

    Deterministic: same texts, size, type and seed give the same bytes (the thread count is fixed). The
    .model file is written last with an atomic rename, so a present .model file is always complete.
    Raises UserError when the corpus cannot support `vocab_size` (too few distinct pieces, or fewer slots
    than the specials + bytes + required characters need). With `soft_limit`, a corpus too small for
    `vocab_size` gets the largest vocabulary it supports instead (the caller reports the size it got).
    `extra_pieces` are special (control) pieces placed right after the fixed ones.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise UserError(f"tokenizer type must be 'unigram' or 'bpe', got {model_type!r}")
    extra_pieces = tuple(extra_pieces)
    check_extra_pieces(extra_pieces)
    out_prefix = Path(out_prefix)
    texts = [t for t in texts if t]  # the trainer chokes on empty strings; they carry nothing anyway
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                       **_trainer_options(vocab_size, model_type, character_coverage, extra_pieces,
                                                          len(texts)))
    except RuntimeError as e:
        most = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", str(e))
        if not (soft_limit and most and int(most[2]) >= MIN_VOCAB_SIZE):
            raise _training_error(str(e), vocab_size) from None
        return train_tokenizer(texts, out_prefix, int(most[2]), model_type, seed=seed,
                               character_coverage=character_coverage, extra_pieces=extra_pieces, meta=meta)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(_processor(model.getvalue()), model.getvalue(), out_prefix.with_suffix(".model"))
    vocab_lines = "".join(f"{json.dumps(tok.id_to_piece(i), ensure_ascii=False)[1:-1]}\t{tok.sp.get_score(i):.6g}\n"
                          for i in range(tok.size))  # pieces JSON-escaped, so "\n" is written as \n
    _atomic_write(out_prefix.parent / (out_prefix.name + ".vocab"), vocab_lines.encode("utf-8"))
    if meta is not None:  # before the .model: a present .model always has its metadata
        meta = {**meta, "vocab_size": tok.size, "sha256": tok.sha256}
        _atomic_write(out_prefix.parent / (out_prefix.name + ".json"), json.dumps(meta, indent=1).encode())
    path = out_prefix.parent / (out_prefix.name + ".model")
    _atomic_write(path, model.getvalue())
    return path


def _training_error(msg: str, vocab_size: int) -> UserError:
    """Turn a sentencepiece trainer failure into a one-line UserError with the fix."""
    if m := re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg):
        if int(m[2]) < MIN_VOCAB_SIZE:
            return UserError(f"vocabulary size {m[1]} is too large for this corpus (sentencepiece allows at most "
                             f"{m[2]}, below the minimum {MIN_VOCAB_SIZE}); give more text")
        return UserError(f"vocabulary size {m[1]} is too large for this corpus (sentencepiece allows at most "
                         f"{m[2]}: `--vocab-size {m[2]}` in `pretrain tokenizer train`); use more text or "
                         f"--set data.vocab_size={m[2]}")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return UserError(f"vocabulary size {m[1]} is too small for this corpus (it needs at least {m[2]} pieces "
                         f"for the specials, bytes and characters: `--vocab-size {m[2]}` in `pretrain tokenizer "
                         f"train`); use --set data.vocab_size={m[2]}")
    if "sentences" in msg.lower() and ("no " in msg.lower() or "empty" in msg.lower()):
        return UserError("no text to train a tokenizer on; give a corpus with text in it")
    first = msg.strip().splitlines()[-1] if msg.strip() else "unknown error"
    return UserError(f"sentencepiece could not train a tokenizer (vocab size {vocab_size}): {first}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _processor(model_bytes: bytes):
    """A SentencePieceProcessor from serialized model bytes."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def _special_problems(sp) -> str:
    """What is wrong with a model's special pieces, as one phrase ("" if nothing): pieces that are
    missing, pieces at another id, and pieces at the right id that are not control pieces (`<unk>` must
    be the unknown piece). A run of sentinels with the same problem is written <extra_id_a..b>."""
    missing, misplaced, wrong_type = [], [], []
    size = sp.get_piece_size()
    for i, piece in enumerate(SPECIAL_PIECES):
        if i < size and sp.id_to_piece(i) == piece:
            if not (sp.is_unknown(i) if i == UNK else sp.is_control(i)):
                wrong_type.append(piece)
            continue
        j = sp.piece_to_id(piece)
        if sp.id_to_piece(j) == piece:
            misplaced.append(f"{piece} (id {j}, needs {i})")
        else:
            missing.append(piece)
    parts = [f"{label}: {', '.join(_collapse_sentinels(names))}" for label, names in
             (("missing", missing), ("at the wrong id", misplaced), ("not control pieces", wrong_type)) if names]
    return "; ".join(parts)


def _collapse_sentinels(names: list[str]) -> list[str]:
    """Write the sentinels in a list of special-piece phrases as one range, e.g. <extra_id_0..99>."""
    ks = [int(m[1]) for n in names if (m := re.fullmatch(r"<extra_id_(\d+)>", n))]
    rest = [n for n in names if not re.fullmatch(r"<extra_id_(\d+)>", n)]
    if len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1)):
        return rest + [f"<extra_id_{ks[0]}..{ks[-1]}>"]
    return names


class Tokenizer:
    """A loaded sentencepiece model with the fixed specials, plus what objectives need (`vocab`).

    `decode` skips special ids by default (they stand for no text); `decode(ids, keep_special=True)` shows
    them as their piece text (`[MASK]`, `<extra_id_0>`), for printing generations. Picklable (carries the
    model bytes).
    """

    def __init__(self, sp, model_bytes: bytes, path: Path | str | None = None, meta: dict | None = None):
        """Wrap a SentencePieceProcessor; use `Tokenizer.load(path)` rather than this."""
        self.sp = sp
        self.model_bytes = model_bytes
        self.path = Path(path) if path is not None else None
        self.meta = meta or {}  # PREFIX.json next to the model, when training wrote one (the sample's figures)
        n = N_SPECIAL
        while n < sp.get_piece_size() and sp.is_control(n):  # the extra special pieces follow the fixed ones
            n += 1
        self.specials: tuple[str, ...] = tuple(sp.id_to_piece(i) for i in range(n))

    @classmethod
    def load(cls, path: Path | str, extra_pieces: tuple[str, ...] = ()) -> Tokenizer:
        """Load and validate a .model file: UserError if it is missing, not a sentencepiece model, lacks any
        fixed special piece at its fixed id, or lacks one of `extra_pieces` as a special piece (naming them)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; give a sentencepiece .model file or leave "
                            "data.tokenizer empty to train one")
        data = path.read_bytes()
        try:
            sp = _processor(data)
        except (RuntimeError, OSError, ValueError, TypeError):  # sentencepiece's parse error is a RuntimeError
            sp = None
        if sp is None or sp.get_piece_size() == 0:
            raise UserError(f"{path} is not a sentencepiece model (a .model file); give one made by "
                            "`pretrain tokenizer train` or sentencepiece") from None
        problems = _special_problems(sp)
        if problems:
            raise UserError(f"tokenizer {path} lacks the special pieces at their fixed ids ({problems}); every "
                            "objective needs <pad> <unk> <s> </s> [CLS] [SEP] [MASK] <extra_id_0..99> as control "
                            f"pieces 0..{N_SPECIAL - 1}: train one with `pretrain tokenizer train` (or leave "
                            "data.tokenizer empty)")
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except (OSError, ValueError):
            meta = {}  # metadata is informative only; a model without it is still a model
        tok = cls(sp, data, path, meta)
        missing = [p for p in extra_pieces if p not in tok.specials]
        if missing:
            raise UserError(f"tokenizer {path} lacks the special pieces {', '.join(missing)} that the objective needs "
                            "(after the fixed ones); leave data.tokenizer empty to train one that has them")
        return tok

    def __reduce__(self):
        return (_tokenizer_from_bytes, (self.model_bytes, self.path))

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        """A tokenizer from the bytes of a .model already validated (a worker process gets it this way)."""
        return _tokenizer_from_bytes(model_bytes, None)

    @property
    def size(self) -> int:
        """Number of pieces (the model's vocabulary size)."""
        return self.sp.get_piece_size()

    @cached_property
    def sha256(self) -> str:
        """sha256 of the .model bytes: identifies the tokenizer in cache keys and metadata."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no <s> or </s> added)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of many texts, encoded by sentencepiece on `num_threads` threads (default: all cores)."""
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids, keep_special: bool = False) -> str:
        """Text of token ids. Special ids (below `vocab.n_special`) are skipped, or written as their piece text
        (`[MASK]`, `<extra_id_3>`) when keep_special is True."""
        ids, n = [int(i) for i in ids], len(self.specials)
        if not keep_special:
            return self.sp.decode([i for i in ids if i >= n])
        out, run = [], []
        for i in ids:
            if i < n:
                out += [self.sp.decode(run), self.specials[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def id_to_piece(self, i: int) -> str:
        """The piece string of id i ("▁the", "<0x0A>", "[MASK]")."""
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece string (the <unk> id if absent)."""
        return self.sp.piece_to_id(piece)

    @cached_property
    def vocab(self) -> Vocab:
        """What objectives need: size, special mask (the special pieces' ids), word starts ("▁..."), piece
        bytes (UTF-8 bytes with "▁" as one space; byte pieces 1; control and unknown pieces 0)."""
        V, n = self.size, len(self.specials)
        special = np.arange(V) < n
        word_start = np.zeros(V, bool)
        piece_bytes = np.zeros(V, np.int64)
        for i in range(n, V):
            piece = self.sp.id_to_piece(i)
            word_start[i] = piece.startswith("▁")
            if self.sp.is_byte(i):
                piece_bytes[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                piece_bytes[i] = len(piece.replace("▁", " ").encode("utf-8"))
        return Vocab(size=V, special=special, word_start=word_start, piece_bytes=piece_bytes, specials=self.specials)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, size={self.size})"


def _tokenizer_from_bytes(model_bytes: bytes, path: Path | None) -> Tokenizer:
    """Unpickle a Tokenizer (already validated when it was first loaded)."""
    return Tokenizer(_processor(model_bytes), model_bytes, path)
