"""Worker processes: documents, sentences, the train/valid decision and tokens of each chunk, in order.

`ordered_map` runs a function over the chunk stream on `data.workers` processes and yields the results in
stream order, with at most WINDOW chunks per worker in flight: memory is bounded by the chunk size, and the
output (hence the cache) does not depend on the worker count, only on the chunks. Python's own `Pool.imap`
would read its whole input ahead; `concurrent.futures.ProcessPoolExecutor` is used because it reports a dead
worker (`BrokenProcessPool`) where a `Pool` waits forever. Workers are spawned (no fork of a process that
runs a progress-bar thread) and ignore Ctrl-C, which the main process handles. The same map with one worker
runs in the calling process. nanoGPT's `data/openwebtext/prepare.py` tokenizes with `datasets.map(num_proc=N)`
in the same spirit; here the order is kept without holding the corpus.

The train/valid split of a document is `blake2b(text, key=split_seed) < valid_fraction * 2^64`: a seeded
hash of its UTF-8 bytes, decided in the worker without any global view, so parts on different machines agree
and identical documents always land in the same split.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pretrain.errors import UserError
from pretrain.text import Piece, piece_documents, split_sentences

WINDOW = 2  # chunks in flight per worker: one being processed, one waiting
_STATE: dict[str, Any] = {}  # per process: the tokenizer and the data config


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 tokens while every id fits (65536 pieces), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def worker_count(requested: int) -> int:
    """`data.workers` (0 = all cores)."""
    return requested if requested > 0 else (os.cpu_count() or 1)


def split_hashes(raw: list[bytes], seed: int) -> np.ndarray:
    """(D,) uint64 seeded hashes of the documents' UTF-8 bytes (little-endian blake2b, 8 bytes)."""
    key = str(seed).encode()
    digests = b"".join(hashlib.blake2b(b, digest_size=8, key=key).digest() for b in raw)
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def is_valid(hashes: np.ndarray, valid_fraction: float) -> np.ndarray:
    """(D,) bool: the documents held out for validation."""
    return hashes < np.uint64(min(int(valid_fraction * 2.0**64), 2**64 - 1))


def setup(model_bytes: bytes | None, cfg: Any, worker: bool = False) -> None:
    """Load the tokenizer (if given) and keep the config, in a worker or in the calling process."""
    if worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
    from pretrain.tokenizer import Tokenizer

    _STATE.update(tok=Tokenizer.from_bytes(model_bytes) if model_bytes else None, cfg=cfg)


def _worker_setup(model_bytes: bytes | None, cfg: Any) -> None:
    """Pool initializer: set up, and leave when the parent dies (a kill -9 of prepare must not leave workers
    blocked on their queue forever)."""
    setup(model_bytes, cfg, worker=True)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:  # reparented: the main process is gone
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def ordered_map(fn: Callable, items: Iterable, args_of: Callable, workers: int, model_bytes: bytes | None,
                cfg: Any) -> Iterator[tuple[Any, Any]]:
    """Yield (item, fn(args_of(item))) for every item, in order, computed on `workers` processes.
    `args_of` is called when the item is submitted (so it may use what earlier results taught)."""
    if workers <= 1:
        setup(model_bytes, cfg)
        for item in items:
            yield item, fn(args_of(item))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_setup, initargs=(model_bytes, cfg))
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, args_of(item))))
            if len(pending) >= WINDOW * workers:
                item0, fut = pending.popleft()
                yield item0, fut.result()
        while pending:
            item0, fut = pending.popleft()
            yield item0, fut.result()
    except BrokenProcessPool:
        raise UserError("a worker process died (out of memory, or a script calling prepare without an `if __name__ == "
                        "'__main__':` guard, which spawned workers need); run again with fewer workers, e.g. --set "
                        f"data.workers={max(1, workers // 2)}: a prepare continues where it stopped") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _documents(pieces: list[Piece]) -> tuple[list[str], list[int], int]:
    """Documents of a chunk, documents per piece, invalid UTF-8 bytes replaced."""
    docs, per_piece, replaced = [], [], 0
    for piece in pieces:
        d, r = piece_documents(piece, _STATE["cfg"].text_field)
        docs += d
        per_piece.append(len(d))
        replaced += r
    return docs, per_piece, replaced


def encode_chunk(pieces: list[Piece]) -> dict:
    """Tokens of a chunk, sentence by sentence (so sentence offsets are exact), and per document its
    sentence count, UTF-8 bytes and split hash. Sentencepiece runs on one thread: the processes are the
    parallelism."""
    tok, cfg = _STATE["tok"], _STATE["cfg"]
    docs, per_piece, replaced = _documents(pieces)
    sents = [split_sentences(d) for d in docs]
    ids = tok.encode_batch([s for doc in sents for s in doc], num_threads=1) if docs else []
    sent_lens = np.fromiter(map(len, ids), np.int64, len(ids))  # (S,)
    assert (sent_lens > 0).all(), "a non-blank sentence gave no tokens"
    raw = [d.encode("utf-8") for d in docs]
    return {
        "tokens": np.fromiter(itertools.chain.from_iterable(ids), token_dtype(tok.size), int(sent_lens.sum())),
        "sent_lens": sent_lens,
        "doc_sents": np.fromiter(map(len, sents), np.int64, len(docs)),  # (D,)
        "doc_bytes": np.fromiter(map(len, raw), np.int64, len(docs)),  # (D,)
        "doc_hash": split_hashes(raw, cfg.split_seed),  # (D,)
        "piece_docs": per_piece, "replaced": replaced,
    }


def sample_chunk(args: tuple[list[Piece], int, float, int]) -> dict:
    """The tokenizer-sample candidates of a chunk: every sentence gets a uniform key seeded by (seed, chunk
    index); those below `threshold` (the k-th smallest key kept so far) are returned with their keys and
    positions in the chunk. Also per document its sentence count and bytes (for the stream limits)."""
    pieces, index, threshold, seed = args
    docs, per_piece, replaced = _documents(pieces)
    sents = [split_sentences(d) for d in docs]
    flat = [s for doc in sents for s in doc]
    keys = np.random.default_rng([seed, index]).random(len(flat))  # (S,)
    pick = np.flatnonzero(keys < threshold)
    return {"keys": keys[pick], "pos": pick, "sents": [flat[i] for i in pick],
            "doc_sents": np.fromiter(map(len, sents), np.int64, len(docs)),
            "doc_bytes": np.fromiter((len(d.encode("utf-8")) for d in docs), np.int64, len(docs)),
            "piece_docs": per_piece, "replaced": replaced}
