"""Writing one part of the token cache: shards of at most `data.shard_tokens` tokens, one at a time, atomically.

A part folder `<cache_dir>/<key>/part-IIIII-of-NNNNN/` holds
  shard-000000/  train.bin, valid.bin        the split's tokens (uint16, or uint32 above 65536 pieces)
                 train.docs.npy, valid.docs.npy    (D+1,) int64 document offsets into that .bin
                 train.sents.npy, valid.sents.npy  (S+1,) int64 sentence offsets (a document start is one)
                 counts.npy                  (2, V) int64 unigram counts of train and valid
  progress.json  the shards done (with their counts), the stream position after the last one, complete
  lock.json      the writing process (host, pid), while one runs
As Megatron-LM's `megatron/core/datasets/indexed_dataset.py` (.bin tokens and .idx offsets), documents and
sentences are offsets into flat token files. A shard is cut at a document boundary (a document longer than
shard_tokens gets a shard of its own), written into `.tmp-shard-N/`, fsync'ed and renamed into place, then
progress.json is replaced: a shard is trusted only once progress.json lists it. A kill at any moment leaves
at most an untrusted folder, which the next run deletes before it continues from the last listed shard.
The stream position after a shard is (the chunk holding the next document, documents to skip in it), and
chunks depend only on where reading starts (pretrain/stream.py), so a resumed part is byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError
from pretrain.workers import is_valid

SPLITS = ("train", "valid")
FORMAT_VERSION = 2  # bump when the cache layout, the split rule or the sentence rule changes: caches are rebuilt


class FolderError(UserError):
    """A problem with the cache folder itself (disk full, read-only, another writer): the finished shards stay,
    so the same command continues once it is fixed."""


def disk_error(e: OSError, path: Path) -> FolderError:
    """One line naming the file-system problem at `path` and its fix."""
    again = "then run the same command again: it continues from the last complete shard"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        mount = Path(path).resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        free = shutil.disk_usage(mount).free / 2**30 if mount.exists() else 0.0
        return FolderError(f"no space left on the disk mounted at {mount} ({free:.1f} GiB free) while writing {path}; "
                         f"free space or set data.cache_dir to another disk, {again}")
    if e.errno == errno.EROFS:
        return FolderError(f"{path} is on a read-only file system; set data.cache_dir to a writable folder")
    if e.errno in (errno.EACCES, errno.EPERM):
        return FolderError(f"no permission to write {path}; set data.cache_dir to a folder you can write")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return FolderError(f"cannot write {path}: a file is where a folder should be (or a folder where a file should "
                         "be); move it away or set data.cache_dir to another folder")
    return FolderError(f"could not write {path} ({e.strerror or e}); check data.cache_dir, {again}")


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); delete its folder and run `pretrain prepare` again") from None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file, fsync and an atomic rename: the file is old or new, never torn."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def offsets(lengths: np.ndarray) -> np.ndarray:
    """(n+1,) int64 offsets [0, l0, l0+l1, ...] of consecutive pieces with the given lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


class Lock:
    """`lock.json` in a part folder, made with O_EXCL: one writer per part, also across machines on a shared
    file system. A lock left by a dead process on this host is taken over; one from another host is named."""

    def __init__(self, folder: Path):
        self.path = folder / "lock.json"
        self.held = False

    def acquire(self) -> None:
        """Take the lock: wait while a live process on this host holds it, take it over from a dead one,
        FolderError when another host holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):  # gone, or being written this instant: look again
                    time.sleep(0.1)
                    continue
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", 0))):
                    self.path.unlink(missing_ok=True)  # its writer was killed: take over
                    continue
                if other.get("host") == me["host"]:  # another prepare of the same inputs on this machine: wait
                    time.sleep(0.5)
                    continue
                raise FolderError(f"{self.path.parent} is being written by pid {other.get('pid')} on "
                                  f"{other.get('host')}; wait for it, or delete {self.path} if that job is gone") \
                    from None
            except OSError as e:
                raise disk_error(e, self.path) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def release(self) -> None:
        """Give the lock back (if held)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    """Whether a process of this host is running."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class ShardWriter:
    """Appends documents of chunk results to the open shard and closes shards into the part folder."""

    def __init__(self, folder: Path, progress: dict, valid_fraction: float):
        self.folder, self.progress, self.valid_fraction = folder, progress, valid_fraction
        self.limit, self.vocab = progress["shard_tokens"], progress["vocab_size"]
        self.tmp: Path | None = None
        self.replaced = 0  # invalid UTF-8 bytes of routed chunks, for the shard open after them

    @property
    def tokens(self) -> int:
        """Tokens in the open shard."""
        return 0 if self.tmp is None else sum(self.stats[s]["tokens"] for s in SPLITS)

    def _open(self) -> None:
        self.name = f"shard-{len(self.progress['shards']):06d}"
        self.tmp = self.folder / f".tmp-{self.name}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.files = {s: open(self.tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.lens = {s: {"docs": [], "sents": []} for s in SPLITS}
        self.stats = {s: {"documents": 0, "sentences": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
        self.counts = np.zeros((2, self.vocab), np.int64)
        self.extreme = {"train": None, "valid": None}  # [hash, local doc] of the min train / max valid hash

    def add(self, res: dict, lo: int, hi: int) -> None:
        """Append documents [lo, hi) of a chunk result (see workers.encode_chunk) to the open shard."""
        if self.tmp is None:
            self._open()
        tok_off, first = res["tok_off"], res["doc_first"]
        held = is_valid(res["doc_hash"][lo:hi], self.valid_fraction)  # (n,)
        tokens = res["tokens"][tok_off[lo]:tok_off[hi]]
        sent_lens = res["sent_lens"][first[lo]:first[hi]]
        doc_tokens, doc_sents = np.diff(tok_off[lo:hi + 1]), res["doc_sents"][lo:hi]
        for i, (name, mask) in enumerate((("train", ~held), ("valid", held))):
            if not mask.any():
                continue
            part = tokens[np.repeat(mask, doc_tokens)]  # (n_tokens,) this split's documents, in order
            self.files[name].write(part.tobytes())
            self.lens[name]["docs"].append(doc_tokens[mask])
            self.lens[name]["sents"].append(sent_lens[np.repeat(mask, doc_sents)])
            self.counts[i] += np.bincount(part, minlength=self.vocab)[: self.vocab]
            self._extreme(name, res["doc_hash"][lo:hi][mask], res["doc_bytes"][lo:hi][mask])
            st = self.stats[name]
            st["documents"] += int(mask.sum())
            st["sentences"] += int(doc_sents[mask].sum())
            st["tokens"] += int(doc_tokens[mask].sum())
            st["bytes"] += int(res["doc_bytes"][lo:hi][mask].sum())

    def _extreme(self, name: str, hashes: np.ndarray, doc_bytes: np.ndarray) -> None:
        """Track [hash, local document, bytes] of the train document with the smallest hash and of the valid
        one with the largest: the one to move when the other split would be empty (manifest.finalize).
        Called before this batch is added to the stats, so local indices start at the shard's count."""
        j = int(hashes.argmin() if name == "train" else hashes.argmax())
        old = self.extreme[name]
        if old is None or (int(hashes[j]) < old[0] if name == "train" else int(hashes[j]) > old[0]):
            self.extreme[name] = [int(hashes[j]), self.stats[name]["documents"] + j, int(doc_bytes[j])]

    def close(self, after: dict | None) -> None:
        """Finish the open shard, rename it into place, and record it in progress.json with the stream
        position `after` it (None: the part's stream is done)."""
        if self.tmp is None:
            return
        for name in SPLITS:
            f = self.files[name]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            for kind in ("docs", "sents"):
                arr = self.lens[name][kind]
                np.save(self.tmp / f"{name}.{kind}.npy", offsets(np.concatenate(arr) if arr else np.zeros(0, np.int64)))
        np.save(self.tmp / "counts.npy", self.counts)
        os.replace(self.tmp, self.folder / self.name)
        self.progress["shards"].append({"name": self.name, **self.stats, "replaced_bytes": self.replaced,
                                        "min_train": self.extreme["train"], "max_valid": self.extreme["valid"]})
        self.progress["next"] = after
        self.replaced, self.tmp = 0, None
        write_json(self.folder / "progress.json", self.progress)

    def abort(self) -> None:
        """Drop the open shard (an interrupted or failed build): it was never trusted."""
        if self.tmp is not None:
            for f in self.files.values():
                f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def index(res: dict) -> None:
    """Add the per-document offsets of a chunk result: doc_first (D+1,) first sentence, tok_off (D+1,) first
    token of each document."""
    res["doc_first"] = offsets(res["doc_sents"])
    res["tok_off"] = offsets(res["sent_lens"])[res["doc_first"]]


def route(writer: ShardWriter, res: dict, skip: int, stop: int, start: dict) -> None:
    """Send documents [skip, stop) of an indexed chunk result to shards, closing a shard before the first
    document that would take it past shard_tokens. `start` is the chunk's position (for the position
    after a shard)."""
    tok_off, j = res["tok_off"], skip
    while j < stop:
        room = writer.limit - writer.tokens
        k = max(j, int(np.searchsorted(tok_off, tok_off[j] + room, side="right")) - 1)  # docs j..k-1 fit
        if k == j and writer.tokens == 0:
            k = j + 1  # a document longer than a shard: a shard of its own
        if k > j:
            writer.add(res, j, min(k, stop))
        if k < stop:
            writer.close({"start": start, "skip": k})
        j = k


def _limit(res: dict, skip: int, cfg: Any, docs: int, tokens: int) -> int:
    """The end of the documents of a chunk that `data.max_docs` / `data.max_tokens` still allow (a prefix
    of the stream: at most max_docs documents, at most max_tokens tokens)."""
    stop = len(res["doc_sents"])
    if cfg.max_docs:
        stop = min(stop, skip + max(0, cfg.max_docs - docs))
    if cfg.max_tokens:
        tok_off = res["tok_off"]
        stop = min(stop, int(np.searchsorted(tok_off, tok_off[skip] + max(0, cfg.max_tokens - tokens), "right")) - 1)
    return max(stop, skip)


def new_progress(part: tuple[int, int], cfg: Any, vocab_size: int, dtype: str, key: str) -> dict:
    """The progress.json of a part that has not started."""
    return {"format_version": FORMAT_VERSION, "key": key, "part": list(part), "shard_tokens": cfg.shard_tokens,
            "vocab_size": vocab_size, "dtype": dtype, "shards": [], "next": {"start": None, "skip": 0},
            "complete": False, "seconds": 0.0}


def _clean(folder: Path, progress: dict) -> None:
    """Delete what a killed run left that progress.json does not list (untrusted by construction)."""
    listed = {sh["name"] for sh in progress["shards"]}
    for p in folder.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith("shard-") and p.name not in listed):
            shutil.rmtree(p, ignore_errors=True)


def build_part(source: Any, part: tuple[int, int], cfg: Any, model_bytes: bytes, folder: Path, progress: dict,
               workers: int, on_chunk: Any) -> dict:
    """Write (or continue) part I of N into `folder` from its progress; returns the progress, complete.

    Chunks are tokenized on `workers` processes, in order; `on_chunk(chunk, res, docs, tokens)` reports
    progress. OSError while writing becomes a FolderError (the open shard is dropped, finished ones stay).
    """
    from pretrain.stream import EmptyFiles
    from pretrain.workers import encode_chunk, ordered_map

    _clean(folder, progress)
    writer, nxt = ShardWriter(folder, progress, cfg.valid_fraction), progress["next"]
    docs = sum(sh[s]["documents"] for sh in progress["shards"] for s in SPLITS)
    tokens = sum(sh[s]["tokens"] for sh in progress["shards"] for s in SPLITS)
    empty, skip = EmptyFiles(cfg.text_field), nxt["skip"]
    try:
        stream = ordered_map(encode_chunk, source.chunks(part, nxt["start"]), lambda c: c.pieces, workers,
                             model_bytes, cfg)
        for chunk, res in stream:
            empty.update(chunk, res["piece_docs"])
            index(res)
            stop = _limit(res, skip, cfg, docs, tokens)
            route(writer, res, skip, stop, chunk.start)
            writer.replaced += res["replaced"]
            docs, tokens = docs + stop - skip, tokens + int(res["tok_off"][stop] - res["tok_off"][skip])
            on_chunk(chunk, res, stop - skip, int(res["tok_off"][stop] - res["tok_off"][skip]))
            if stop < len(res["doc_sents"]):
                stream.close()  # the limit is reached: a prefix of the stream
                break
            skip = 0
        writer.close(None)
        progress["complete"] = True
        write_json(folder / "progress.json", progress)
    except OSError as e:
        raise disk_error(e, folder) from None
    finally:
        writer.abort()
    return progress
