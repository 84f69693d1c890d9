"""The tokenizer's training text: a seeded uniform sample of at most `data.tokenizer_sample` sentences of the
stream, drawn without holding the corpus.

Reservoir sampling by random keys (Efraimidis & Spirakis 2006, "Weighted random sampling with a reservoir",
with equal weights): every sentence gets a uniform key, and the sample is the k sentences with the smallest
keys, a uniform sample without replacement. Keys are seeded by (seed, chunk index), so they do not depend on
the worker count; workers return only the sentences below the k-th smallest key kept so far (pretrain/
workers.py `sample_chunk`), and the main process holds at most 2k candidates. The sample is handed to
sentencepiece in stream order, so a stream of at most k sentences trains on every sentence, in order: what
training on the whole corpus did. The sample's figures go into the tokenizer's metadata (`PREFIX.json`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError

SAMPLE_SEED = 1234  # seeds the sentence keys: the same stream always gives the same sample
BYTES_PER_TOKEN = 4  # with data.max_tokens, the sample is drawn from this many bytes a token of the stream


def _stop(res: dict, seen: dict, cfg: Any) -> int:
    """Documents of a chunk result inside the stream limits (data.max_docs; data.max_tokens as bytes)."""
    stop = len(res["doc_sents"])
    if cfg.max_docs:
        stop = min(stop, max(0, cfg.max_docs - seen["documents"]))
    if cfg.max_tokens:
        room = BYTES_PER_TOKEN * cfg.max_tokens - seen["bytes"]
        stop = min(stop, int(np.searchsorted(np.cumsum(res["doc_bytes"]), room, side="right")))
    return stop


def sample_sentences(source: Any, cfg: Any, workers: int, on_chunk: Callable) -> tuple[list[str], dict]:
    """At most `cfg.tokenizer_sample` sentences of the stream (see the module docstring), in stream order,
    and what was seen: documents, sentences, bytes, sampled. `on_chunk(chunk, docs, bytes)` reports progress.
    Input errors are UserErrors raised before anything is written."""
    from pretrain.stream import EmptyFiles
    from pretrain.workers import ordered_map, sample_chunk

    k = cfg.tokenizer_sample
    keys, order, sents = np.zeros(0), np.zeros(0, np.int64), []
    threshold = [1.0]
    seen = {"documents": 0, "sentences": 0, "bytes": 0}
    empty = EmptyFiles(cfg.text_field)
    stream = ordered_map(sample_chunk, source.chunks(), lambda c: (c.pieces, c.index, threshold[0], SAMPLE_SEED),
                         workers, None, cfg)
    for chunk, res in stream:
        empty.update(chunk, res["piece_docs"])
        stop = _stop(res, seen, cfg)
        n_sents = int(res["doc_sents"][:stop].sum())
        keep = res["pos"] < n_sents  # candidates from the documents inside the limits
        keys = np.concatenate([keys, res["keys"][keep]])
        order = np.concatenate([order, chunk.index * (1 << 32) + res["pos"][keep]])  # (chunk, position) in one key
        sents += [s for s, ok in zip(res["sents"], keep, strict=True) if ok]
        seen["documents"] += stop
        seen["sentences"] += n_sents
        seen["bytes"] += int(res["doc_bytes"][:stop].sum())
        if len(keys) > 2 * k:
            keys, order, sents = _smallest(keys, order, sents, k)
        if len(keys) >= k:
            threshold[0] = float(np.partition(keys, k - 1)[k - 1])
        on_chunk(chunk, stop, int(res["doc_bytes"][:stop].sum()))
        if stop < len(res["doc_sents"]):
            stream.close()
            break
    keys, order, sents = _smallest(keys, order, sents, k)
    in_order = np.argsort(order, kind="stable")
    return [sents[i] for i in in_order], {**seen, "sampled": len(sents), "tokenizer_sample": k, "seed": SAMPLE_SEED}


def _smallest(keys: np.ndarray, order: np.ndarray, sents: list[str], k: int):
    """The k candidates with the smallest keys."""
    if len(keys) <= k:
        return keys, order, sents
    idx = np.argpartition(keys, k - 1)[:k]
    return keys[idx], order[idx], [sents[i] for i in idx]


def train_for_source(source: Any, cfg: Any, out_prefix: Path, vocab_size: int, model_type: str, *, seed: int,
                     soft_limit: bool, extra_pieces: tuple[str, ...], workers: int, on_chunk: Callable,
                     on_train: Callable = lambda: None, min_docs: int = 1) -> tuple[Path, dict]:
    """Sample the stream, train a tokenizer on the sample and write `out_prefix.model` with its metadata
    (`out_prefix.json`: the sample's figures and the source). Returns the path and the timings. UserError
    when the stream holds no text or fewer than `min_docs` documents (nothing is written then)."""
    from pretrain.tokenizer import train_tokenizer

    t = time.perf_counter()
    sents, info = sample_sentences(source, cfg, workers, on_chunk)
    read_s = time.perf_counter() - t
    if info["documents"] == 0:
        raise UserError(f"{source.description} holds no text; give a corpus with text in it")
    if info["documents"] < min_docs:
        raise UserError(f"the corpus has {info['documents']} document(s), but a train/validation split needs at least "
                        "2; give more text (for a .txt file, separate documents by blank lines or use --set "
                        "data.doc_per=line)")
    on_train()
    t = time.perf_counter()
    meta = {"sample": info, "source": {"description": source.description, "fingerprint": source.fingerprint},
            "vocab_size": vocab_size, "type": model_type, "seed": seed}
    path = train_tokenizer(sents, out_prefix, vocab_size, model_type, seed=seed, soft_limit=soft_limit,
                           extra_pieces=extra_pieces, meta=meta)
    return path, {"read_seconds": read_s, "tokenizer_seconds": time.perf_counter() - t, "sample": info}
