"""`prepare`: tokenizer and token cache for a DataConfig, built from a stream with bounded memory.

Steps: resolve the source and fingerprint it (cheap, pretrain/stream.py); use `data.tokenizer`, or the
tokenizer trained for this corpus (trained now if absent, on a sample of the stream: pretrain/sample.py); if
the cache for (tokenizer, source, options) is complete, open it (reused). Otherwise write part 0 of 1 (or
continue it: an interrupted prepare resumes from its last complete shard, pretrain/shards.py) and merge
(pretrain/manifest.py). `prepare_part` writes part I of N for a cluster job; `merge_cache` joins the parts.
The cache key covers everything the content depends on, never the worker count or the shard size.

Errors: a bad input is a UserError, and whatever this call created for the cache is removed (the key
changes once the input is fixed, so nothing could be reused); a file-system error (full disk, ...) keeps the
finished shards so the same command continues.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pretrain import stream
from pretrain.bars import Bars
from pretrain.errors import UserError
from pretrain.manifest import complete_parts, finalize, part_name
from pretrain.shards import (
    FORMAT_VERSION,
    FolderError,
    Lock,
    build_part,
    disk_error,
    new_progress,
    read_json,
    write_json,
)
from pretrain.stream import resolve_source, sha_json
from pretrain.workers import token_dtype, worker_count

TOKENIZER_SEED = 1234  # sentencepiece's sampling seed when training a tokenizer for a corpus


def workers_for(cfg: Any, source: Any, part: tuple[int, int]) -> int:
    """Worker processes: data.workers (0 = all cores), no more than the input has chunks."""
    n = worker_count(cfg.workers)
    total = source.total(part) if source.kind == "files" else None
    return min(n, total // stream.CHUNK_BYTES + 1) if total is not None else n


def _mkdir(path: Path, made: list[Path]) -> None:
    """mkdir -p, remembering the folders this call created (to remove them after a bad input)."""
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, path) from None
    made += missing


def _tokenizer(cfg: Any, source: Any, extra_pieces: tuple[str, ...], root: Path, bars: Bars):
    """The given tokenizer, or the one trained for this corpus (trained now on a sample if absent)."""
    from pretrain.sample import train_for_source
    from pretrain.tokenizer import Tokenizer

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer, extra_pieces), {}
    extra = {"extra_pieces": list(extra_pieces)} if extra_pieces else {}  # none: the key stays as it was
    tkey = sha_json({"source": source.fingerprint, "vocab_size": cfg.vocab_size, "type": cfg.tokenizer_type,
                     "seed": TOKENIZER_SEED, "format": FORMAT_VERSION, "limit": cfg.vocab_limit, **extra,
                     "sample": cfg.tokenizer_sample, "max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens})[:24]
    tpath = root / "tokenizers" / f"{tkey}.model"
    timings: dict = {}
    train_task: list = []
    if not tpath.is_file():
        task = bars.task("sampling", source.total((0, 1)) if source.kind != "dataset" else None)

        def on_chunk(chunk, docs, nbytes):
            """Progress of the sample pass."""
            bars.advance(task, chunk.units, nbytes=nbytes, docs=docs)

        def on_train():
            """The sample is drawn: training starts."""
            bars.finish(task)
            train_task.append(bars.task("tokenizer", None))

        try:
            _, timings = train_for_source(source, cfg, tpath.with_suffix(""), cfg.vocab_size, cfg.tokenizer_type,
                                          seed=TOKENIZER_SEED, soft_limit=cfg.vocab_limit == "soft",
                                          extra_pieces=extra_pieces, workers=workers_for(cfg, source, (0, 1)),
                                          on_chunk=on_chunk, on_train=on_train, min_docs=2)
        except OSError as e:
            raise disk_error(e, tpath.parent) from None
        bars.finish(train_task[0])
    return Tokenizer.load(tpath), timings


def cache_key(cfg: Any, tok: Any, source: Any) -> str:
    """The cache folder's name: a hash of everything the cache content depends on."""
    return sha_json({"tokenizer": tok.sha256, "source": source.fingerprint, "doc_per": cfg.doc_per,
                     "text_field": cfg.text_field, "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed,
                     "max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens, "format": FORMAT_VERSION})[:24]


def _common(cfg: Any, tok: Any, source: Any, key: str) -> dict:
    """What the manifest says about the inputs."""
    return {"key": key, "tokenizer": {"sha256": tok.sha256, "path": str(tok.path), "size": tok.size,
                                      "sample": tok.meta.get("sample")},
            "source": {"kind": source.kind, "description": source.description, "fingerprint": source.fingerprint,
                       "files": source.files[:1000], "n_files": len(source.files)},
            "reading": {"doc_per": cfg.doc_per, "text_field": cfg.text_field},
            "split": {"valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed, "rule": "blake2b"},
            "limits": {"max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens},
            "dtype": token_dtype(tok.size).name, "vocab_size": tok.size}


def _run_part(cfg: Any, source: Any, tok: Any, path: Path, part: tuple[int, int], key: str, bars: Bars,
              made: list[Path]) -> dict:
    """Write (or continue) part I of N under the cache folder; returns its progress (complete)."""
    folder = path / part_name(part)
    _mkdir(folder, made)
    lock = Lock(folder)
    try:
        lock.acquire()
        progress = read_json(folder / "progress.json") or new_progress(part, cfg, tok.size,
                                                                       token_dtype(tok.size).name, key)
        if progress["complete"]:
            return progress
        resumed = len(progress["shards"])
        task = bars.task(f"part {part[0]}/{part[1]}" if part[1] > 1 else "tokenizing", source.total(part))
        t, built = time.perf_counter(), [0]

        def on_chunk(chunk, res, docs, tokens):
            """Progress of the tokenize pass."""
            built[0] += tokens
            bars.advance(task, chunk.units, nbytes=int(res["doc_bytes"].sum()), docs=docs, tokens=tokens)

        progress["workers"] = workers_for(cfg, source, part)
        try:
            build_part(source, part, cfg, tok.model_bytes, folder, progress, progress["workers"], on_chunk)
        finally:  # an interrupted run keeps its time and work in the progress of its finished shards
            progress["seconds"] = progress.get("seconds", 0.0) + time.perf_counter() - t
            progress["tokens_built"] = progress.get("tokens_built", 0) + built[0]
            progress["resumed"] = resumed
            if progress["shards"] or progress["complete"]:
                try:
                    write_json(folder / "progress.json", progress)
                except OSError:
                    pass  # the disk is full: the error being raised already says so
        bars.finish(task)
        return progress
    finally:
        lock.release()


def _stats(manifest: dict, build: dict, reused: bool, seconds: float, path: Path) -> dict:
    """The figures `prepare` reports (see `pretrain.data.prepare`)."""
    sp = manifest["splits"]
    totals = {k: sum(sp[s][k] for s in sp) for k in ("documents", "sentences", "tokens", "bytes")}
    return {**totals, **{s: {k: v for k, v in sp[s].items() if k != "segments"} for s in sp}, **build,
            "replaced_bytes": manifest["replaced_bytes"], "reused": reused, "seconds": seconds,
            "shards": manifest["shards"], "parts": manifest["parts"], "source": manifest["source"]["description"],
            "path": str(path), "tokenizer_path": manifest["tokenizer"]["path"], "vocab_size": manifest["vocab_size"],
            "dtype": manifest["dtype"]}


def _merge(cfg: Any, source: Any, tok: Any, path: Path, n: int, key: str, timings: dict) -> tuple[dict, dict]:
    """Finalize parts 0..N-1 and write build.json; returns build.json's figures."""
    common = _common(cfg, tok, source, key)
    if source.kind == "builtin":
        from pretrain import corpus

        docs = [d for i in range(len(source.paths)) for d in source.documents(i)]
        common["corpus"] = corpus.corpus_info(docs)  # name, Python version, sha256 of the text, counts
    try:
        manifest = finalize(path, n, common)
        parts = [read_json(path / part_name((i, n)) / "progress.json") for i in range(n)]
        seconds = sum(p.get("seconds", 0.0) for p in parts)
        built = sum(p.get("tokens_built", 0) for p in parts)
        build = {"read_seconds": timings.get("read_seconds", 0.0),
                 "tokenizer_seconds": timings.get("tokenizer_seconds", 0.0), "tokenize_seconds": seconds,
                 "tokens_per_s": built / max(seconds, 1e-9), "workers": max(p.get("workers", 1) for p in parts),
                 "shards_built": sum(len(p["shards"]) - p.get("resumed", 0) for p in parts),
                 "shards_resumed": sum(p.get("resumed", 0) for p in parts)}
        write_json(path / "build.json", build)
    except OSError as e:
        raise disk_error(e, path) from None
    return manifest, build


def _cleanup(made: list[Path], folder: Path | None) -> None:
    """After a bad input: remove the part folder this call wrote and the folders it created, if empty."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        made = [folder.parent, *made]
    for p in sorted(made, key=lambda x: len(x.parts), reverse=True):
        try:
            p.rmdir()
        except OSError:
            pass  # not empty: something else lives there


def _check_part(cfg: Any, source: Any, part: tuple[int, int]) -> None:
    """UserError for a part that cannot be written: out of range, no tokenizer given, a stream limit."""
    index, count = part
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--part {index}/{count}: the part index must be in 0..{count - 1} (and N >= 1); the parts "
                        f"of N jobs are 0/N .. {count - 1}/N")
    if not cfg.tokenizer:
        raise UserError("--part needs the tokenizer every part shares: train it once with `pretrain tokenizer train "
                        "--data ... --out tok`, then pass --set data.tokenizer=tok.model to every part")
    if cfg.max_docs or cfg.max_tokens:
        raise UserError("data.max_docs / data.max_tokens take a prefix of one stream and cannot be combined with "
                        "--part; prepare without --part, or drop the limit")
    source.check_part(part)


def _prepare(cfg: Any, extra_pieces: tuple[str, ...], show: bool, console: Any, part: tuple[int, int] | None,
             merge: bool):
    """`prepare_cache`, `prepare_part` and `merge_cache` (see the module docstring)."""
    from pretrain.data import Prepared, TokenCache

    t0, bars, made, folder = time.perf_counter(), Bars(show, console), [], None
    try:
        source = resolve_source(cfg)
        if part is not None:
            _check_part(cfg, source, part)
        root = Path(cfg.cache_dir).expanduser()
        tok, timings = _tokenizer(cfg, source, extra_pieces, root, bars)
        key = cache_key(cfg, tok, source)
        path = root / key
        if (path / "manifest.json").is_file():
            try:
                cache = TokenCache.open(path)
            except UserError:  # a torn or stale manifest: the parts are trusted, so merge them again
                (path / "manifest.json").unlink(missing_ok=True)
            else:
                stats = _stats(cache.meta, cache.meta["build"], True, time.perf_counter() - t0, path)
                return stats if part is not None else Prepared(tok, cache, stats)
        if part is not None:
            folder = path / part_name(part)
            progress = _run_part(cfg, source, tok, path, part, key, bars, made)
            return _part_stats(progress, part, folder, time.perf_counter() - t0)
        n = complete_parts(path, merge)
        if n is None:
            folder = path / part_name((0, 1))
            _run_part(cfg, source, tok, path, (0, 1), key, bars, made)
            n = 1
        manifest, build = _merge(cfg, source, tok, path, n, key, timings)
        cache = TokenCache.open(path)
        return Prepared(tok, cache, _stats(cache.meta, build, False, time.perf_counter() - t0, path))
    except FolderError:
        raise
    except UserError:
        _cleanup(made, folder)
        raise
    finally:
        bars.close()


def _part_stats(progress: dict, part: tuple[int, int], folder: Path, seconds: float) -> dict:
    """The figures `prepare --part` reports."""
    sh = progress["shards"]
    out = {k: sum(x[s][k] for x in sh for s in ("train", "valid")) for k in ("documents", "sentences", "tokens",
                                                                             "bytes")}
    return {"part": f"{part[0]}/{part[1]}", **out, "shards": len(sh), "shards_resumed": progress.get("resumed", 0),
            "seconds": seconds, "tokens_per_s": progress.get("tokens_built", 0) / max(progress.get("seconds", 0), 1e-9),
            "path": str(folder)}


def prepare_cache(cfg: Any, extra_pieces: tuple[str, ...] = (), progress: bool = True, console: Any = None):
    """The tokenizer and complete cache for `cfg` (see `pretrain.data.prepare`): reused, continued, merged
    from complete parts, or built as part 0 of 1."""
    return _prepare(cfg, extra_pieces, progress, console, None, False)


def prepare_part(cfg: Any, part: tuple[int, int], progress: bool = True, console: Any = None) -> dict:
    """Write part I of N (`pretrain prepare --part I/N`) into the cache folder; returns its figures. The
    tokenizer must be given (data.tokenizer), so that every part shares it."""
    return _prepare(cfg, (), progress, console, part, False)


def merge_cache(cfg: Any, extra_pieces: tuple[str, ...] = (), progress: bool = True, console: Any = None):
    """Join the complete parts of the cache for `cfg` (`pretrain prepare --merge`); UserError naming the
    parts that are missing or unfinished."""
    return _prepare(cfg, extra_pieces, progress, console, None, True)
