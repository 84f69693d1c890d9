"""Our sentencepiece tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`) that gives exactly our ids.

Why a `tokenizer.json` built here rather than the slow sentencepiece classes (`T5Tokenizer`, `LlamaTokenizer`) or
transformers' `convert_slow_tokenizer`: each of those classes rewrites the pipeline to its own family's
conventions (a dummy "▁" prefix, `legacy` handling of text after special tokens, an `</s>` appended), and none
knows our normalization. So we write the pipeline sentencepiece itself runs, piece by piece from the model
proto (the approach of transformers `convert_slow_tokenizer.py`, `SpmConverter.build_tokenizer_from_spm_proto`):

- normalizer: identity, no dummy prefix, whitespace kept; only " " becomes "▁" (sentencepiece's
  `escape_whitespaces`). A model with another normalizer spec is refused rather than approximated.
- pre-tokenizer: the user-defined pieces ("\\n") are isolated, as sentencepiece emits them whole.
- model: `Unigram` with the piece scores, or `BPE` with merges ranked by the merged piece's score (sentencepiece
  BPE merges the best-scored adjacent pair first), both with byte fallback. Control, unknown and byte pieces get
  a score far below every ordinary piece: sentencepiece never matches them in text, so neither may we.
- special pieces are special tokens that text never produces (`split_special_tokens=True`): a literal "[MASK]"
  or "<pad>" in a document stays text, as in `Tokenizer.encode`. To put a mask in, use `tokenizer.mask_token_id`,
  or call the tokenizer with `split_special_tokens=False`.
- post-processor: the objective's framing (`Objective.framing`), so `tokenizer(text)` frames a text the way
  training batches did (`[CLS] A [SEP] B [SEP]` with segment ids for BERT pairs, `<s> ... </s>`, `... </s>`).

`tests/test_export.py` checks the ids against `Tokenizer.encode` on hostile text and on the built-in corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    from objectives.base import Framing
    from pretrain.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece ModelProto piece types
UNIGRAM, BPE = 1, 2  # sentencepiece TrainerSpec model types
NEVER = -1e6  # score of a piece text never produces (far below any log-probability or BPE rank)


def _proto(tok: Tokenizer):
    """The parsed sentencepiece ModelProto of `tok`; UserError when its normalization is not ours."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(tok.model_bytes)
    ns = m.normalizer_spec
    if ns.precompiled_charsmap or ns.add_dummy_prefix or ns.remove_extra_whitespaces or not ns.escape_whitespaces:
        raise UserError(f"tokenizer {tok.path} normalizes text in a way export cannot reproduce exactly (rule "
                        f"{ns.name!r}); use a tokenizer made by `pretrain tokenizer train` or `pretrain run`")
    if m.trainer_spec.model_type not in (UNIGRAM, BPE) or not m.trainer_spec.byte_fallback:
        raise UserError(f"tokenizer {tok.path} is not a byte-fallback unigram or BPE model; use one made by "
                        "`pretrain tokenizer train` or `pretrain run`")
    return m


def _model(m):
    """The `tokenizers` model (Unigram or BPE) of the proto `m`."""
    from tokenizers import models

    pieces = [(p.piece, p.score if p.type == NORMAL else NEVER) for p in m.pieces]
    if m.trainer_spec.model_type == UNIGRAM:
        return models.Unigram(pieces, unk_id=m.trainer_spec.unk_id, byte_fallback=True)
    normal = {p.piece: (p.score, i) for i, p in enumerate(m.pieces) if p.type == NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    return models.BPE(vocab, [(a, b) for _, _, a, b in ranked], unk_token=m.trainer_spec.unk_piece, fuse_unk=True,
                      byte_fallback=True, ignore_merges=False)


def backend(tok: Tokenizer, framing: Framing, segments: bool):
    """A `tokenizers.Tokenizer` that encodes like `tok` (module docstring) and frames like `framing`; `segments`:
    the second text of a pair gets token type 1 (BERT)."""
    import re

    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    m = _proto(tok)
    out = Backend(_model(m))
    out.normalizer = normalizers.Replace(" ", "▁")
    user = [p.piece for p in m.pieces if p.type == USER_DEFINED]
    if user:
        pattern = "|".join(re.escape(p) for p in sorted(user, key=len, reverse=True))
        out.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    pre = [tok.specials[i] for i in framing.prefix]
    suf = [tok.specials[i] for i in framing.suffix]
    b = 1 if segments else 0
    out.post_processor = processors.TemplateProcessing(
        single=[*pre, "$A", *suf], pair=[*pre, "$A", *suf, "$B:" + str(b), *(f"{s}:{b}" for s in suf)],
        special_tokens=[(p, tok.piece_to_id(p)) for p in dict.fromkeys(pre + suf)])
    return out


def hf_tokenizer(tok: Tokenizer, framing: Framing, segments: bool, max_len: int):
    """The transformers fast tokenizer of `tok`: every special piece a special token at its id, text never producing
    one; `max_len` is the model's context (`model_max_length`)."""
    from transformers import PreTrainedTokenizerFast

    from pretrain.tokenizer import BOS, CLS, EOS, MASK, PAD, SENTINEL0, SEP, UNK

    named = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "cls_token": CLS,
             "sep_token": SEP, "mask_token": MASK}
    extra = [p for i, p in enumerate(tok.specials) if i >= SENTINEL0]  # sentinels, then the objective's own pieces
    return PreTrainedTokenizerFast(tokenizer_object=backend(tok, framing, segments),
                                   **{k: tok.specials[i] for k, i in named.items()}, extra_special_tokens=extra,
                                   split_special_tokens=True, model_max_length=max_len, padding_side="right",
                                   clean_up_tokenization_spaces=False)


def save(tok: Tokenizer, framing: Framing, segments: bool, max_len: int, out: Path) -> None:
    """Write the tokenizer files into `out` (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    hf_tokenizer(tok, framing, segments, max_len).save_pretrained(str(out))
