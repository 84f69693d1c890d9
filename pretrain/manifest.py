"""Joining the finished parts of a token cache into one manifest (`pretrain prepare --merge`, or any prepare).

A cache folder `<cache_dir>/<key>/` holds the parts (pretrain/shards.py) and, once they are all complete:
  <split>.docs.npy            (D+1,) int64 document offsets into the split's token stream (all shards, in order)
  <split>.sents.npy           (S+1,) int64 sentence offsets
  <split>.sent_doc.npy        (S,) int64 the document of each sentence
  <split>.doc_first_sent.npy  (D+1,) int64 the first sentence of each document
  <split>.unigram.npy         (V,) int64 token counts (unigram baselines cost nothing at run time)
  manifest.json               written last; a cache is trusted only when its manifest says complete
  build.json                  timings and worker counts (not part of the content)
The manifest lists each split as segments: a range of documents of one shard's train or valid file, in
stream order. Offsets are global and memory-mapped, so opening a 10 GB cache reads a few KB; they are
written shard by shard with plain appends (no big array in memory, no dirty memory map). The part folders
for N parts are `part-IIIII-of-NNNNN`; one `pretrain prepare` is part 0 of 1.

A split needs one document at least. The hash split (pretrain/workers.py) of a tiny corpus may hold none
out; then the train document with the smallest hash becomes the validation split (and, symmetrically, the
validation document with the largest hash trains when nothing would): a segment of one document, so no
shard is rewritten and the rule needs no global view beyond the shards' recorded extremes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.shards import FORMAT_VERSION, SPLITS, read_json, write_json

ARRAYS = ("docs", "sents", "sent_doc", "doc_first_sent", "unigram")
_PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def part_name(part: tuple[int, int]) -> str:
    """The folder of part I of N."""
    return f"part-{part[0]:05d}-of-{part[1]:05d}"


def find_parts(path: Path) -> dict[int, dict[int, dict | None]]:
    """{N: {I: progress or None}} of the part folders under a cache folder."""
    out: dict[int, dict[int, dict | None]] = {}
    for p in sorted(path.iterdir()) if path.is_dir() else ():
        if (m := _PART.fullmatch(p.name)) and p.is_dir():
            out.setdefault(int(m[2]), {})[int(m[1])] = read_json(p / "progress.json")
    return out


def complete_parts(path: Path, merge: bool) -> int | None:
    """The N whose parts 0..N-1 are all complete, None when there are no parts of N > 1 (and, with `merge`,
    none at all); UserError naming the missing and unfinished parts otherwise."""
    found = find_parts(path)
    done = [n for n, parts in found.items() if all((parts.get(i) or {}).get("complete") for i in range(n))]
    if done:
        return min(done)
    multi = {n: parts for n, parts in found.items() if n > 1}
    if not multi:
        if merge:
            raise UserError(f"no parts to merge in {path}; run `pretrain prepare --part I/N` for I = 0..N-1 first")
        return None
    n, parts = max(multi.items(), key=lambda kv: sum(bool((p or {}).get("complete")) for p in kv[1].values()))
    missing = [f"{i}/{n}" for i in range(n) if i not in parts]
    unfinished = [f"{i}/{n}" for i in range(n) if i in parts and not (parts[i] or {}).get("complete")]
    what = "; ".join(x for x in (f"missing: {', '.join(missing)}" if missing else "",
                                 f"unfinished: {', '.join(unfinished)}" if unfinished else "") if x)
    raise UserError(f"cannot merge the {n} parts of {path} ({what}); run `pretrain prepare --part I/{n}` with the "
                    "same data and tokenizer for each of them, then `pretrain prepare --merge`")


def _segments(path: Path, n: int) -> tuple[dict[str, list[dict]], dict[str, int], int]:
    """Each split's segments in stream order, its UTF-8 bytes, and the invalid bytes replaced."""
    segs: dict[str, list[dict]] = {s: [] for s in SPLITS}
    n_bytes, replaced = dict.fromkeys(SPLITS, 0), 0
    for i in range(n):
        progress = read_json(path / part_name((i, n)) / "progress.json")
        for sh in progress["shards"]:
            replaced += sh["replaced_bytes"]
            for s in SPLITS:
                st = sh[s]
                n_bytes[s] += st["bytes"]
                if st["documents"]:
                    segs[s].append({"shard": f"{part_name((i, n))}/{sh['name']}", "file": s,
                                    "docs": [0, st["documents"]], "sents": [0, st["sentences"]],
                                    "tokens": [0, st["tokens"]],
                                    "extreme": sh["min_train" if s == "train" else "max_valid"]})
    return segs, n_bytes, replaced


def _move_one(path: Path, segs: dict[str, list[dict]], n_bytes: dict[str, int], to: str) -> None:
    """Make split `to` one document: the other split's document with the smallest (train) or largest
    (valid) hash, cut out of its segment (see the module docstring)."""
    src = "train" if to == "valid" else "valid"
    pick = (min if src == "train" else max)(range(len(segs[src])), key=lambda k: segs[src][k]["extreme"][0])
    seg = segs[src][pick]
    _, d, moved_bytes = seg["extreme"]
    docs = np.load(path / seg["shard"] / f"{seg['file']}.docs.npy")
    sents = np.load(path / seg["shard"] / f"{seg['file']}.sents.npy")
    s0, s1 = (int(x) for x in np.searchsorted(sents, docs[[d, d + 1]]))

    def cut(d0: int, d1: int, a: int, b: int) -> dict:
        """The segment's documents [d0, d1) (sentences [a, b))."""
        return {**seg, "docs": [d0, d1], "sents": [a, b], "tokens": [int(docs[d0]), int(docs[d1])]}

    rest = [cut(0, d, 0, s0), cut(d + 1, seg["docs"][1], s1, seg["sents"][1])]
    segs[src][pick:pick + 1] = [c for c in rest if c["docs"][1] > c["docs"][0]]
    segs[to] = [cut(d, d + 1, s0, s1)]
    n_bytes[src] -= moved_bytes
    n_bytes[to] += moved_bytes


class _Appender:
    """An .npy file of known length written by appends: the header first, then the values in order
    (through the page cache, never as a big array or a dirty memory map), renamed into place at the end."""

    def __init__(self, path: Path, length: int):
        self.path, self.left = path, length
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": "<i8", "fortran_order": False, "shape": (length,)})

    def add(self, values) -> None:
        """Append values (int64)."""
        arr = np.asarray(values, dtype="<i8")
        self.left -= len(arr)
        arr.tofile(self.f)

    def close(self) -> None:
        """Flush, fsync and rename into place (every value must have been added)."""
        assert self.left == 0, "wrong length"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)


def _write_split(path: Path, name: str, segs: list[dict], vocab_size: int, dtype: str) -> None:
    """The global arrays of one split (see the module docstring), segment by segment."""
    n_docs = sum(g["docs"][1] - g["docs"][0] for g in segs)
    n_sents = sum(g["sents"][1] - g["sents"][0] for g in segs)
    out = {a: _Appender(path / f"{name}.{a}.npy", k) for a, k in
           (("docs", n_docs + 1), ("sents", n_sents + 1), ("sent_doc", n_sents), ("doc_first_sent", n_docs + 1))}
    counts = np.zeros(vocab_size, np.int64)
    tok = doc = sent = 0
    for g in segs:
        folder = path / g["shard"]
        docs, sents = np.load(folder / f"{g['file']}.docs.npy"), np.load(folder / f"{g['file']}.sents.npy")
        (d0, d1), (s0, s1), (t0, t1) = g["docs"], g["sents"], g["tokens"]
        first = np.searchsorted(sents, docs[d0:d1 + 1])  # (n+1,) local first sentence of each document
        out["docs"].add(docs[d0:d1] - t0 + tok)
        out["sents"].add(sents[s0:s1] - t0 + tok)
        out["doc_first_sent"].add(first[:-1] - s0 + sent)
        out["sent_doc"].add(np.repeat(np.arange(d1 - d0) + doc, np.diff(first)))
        if d0 == 0 and d1 == len(docs) - 1:  # a whole file: its counts were taken at prepare time
            counts += np.load(folder / "counts.npy")[SPLITS.index(g["file"])]
        else:
            part = np.memmap(folder / f"{g['file']}.bin", dtype=np.dtype(dtype), mode="r")[t0:t1]
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        tok, doc, sent = tok + t1 - t0, doc + d1 - d0, sent + s1 - s0
    for a, last in (("docs", tok), ("sents", tok), ("doc_first_sent", sent)):
        out[a].add([last])
    for a in out.values():
        a.close()
    np.save(path / f"{name}.unigram.npy", counts)


def finalize(path: Path, n: int, common: dict) -> dict:
    """Join the complete parts 0..N-1 of the cache at `path`: write the global arrays, then manifest.json
    (last: from then on the cache is trusted). `common` is what the manifest says about the inputs
    (tokenizer, source, options, dtype, vocab_size). UserError when the corpus has fewer than 2 documents."""
    _remove_stale_tmp(path)
    segs, n_bytes, replaced = _segments(path, n)
    total = sum(g["docs"][1] - g["docs"][0] for s in SPLITS for g in segs[s])
    if total < 2:
        raise UserError(f"the corpus has {total} document(s), but a train/validation split needs at least 2; "
                        "give more text (for a .txt file, separate documents by blank lines or use "
                        "--set data.doc_per=line)")
    for to in SPLITS[::-1]:
        if not segs[to]:
            _move_one(path, segs, n_bytes, to)
    splits, files = {}, {}
    for s in SPLITS:
        _write_split(path, s, segs[s], common["vocab_size"], common["dtype"])
        for g in segs[s]:
            g.pop("extreme", None)
            rel = f"{g['shard']}/{g['file']}.bin"
            files[rel] = (path / rel).stat().st_size
        splits[s] = {"documents": sum(g["docs"][1] - g["docs"][0] for g in segs[s]),
                     "sentences": sum(g["sents"][1] - g["sents"][0] for g in segs[s]),
                     "tokens": sum(g["tokens"][1] - g["tokens"][0] for g in segs[s]), "bytes": n_bytes[s],
                     "segments": segs[s]}
    shards = {g["shard"] for s in SPLITS for g in segs[s]}
    manifest = {"format_version": FORMAT_VERSION, "complete": True, **common, "parts": n, "shards": len(shards),
                "splits": splits, "replaced_bytes": replaced, "files": files}
    write_json(path / "manifest.json", manifest)
    return manifest


def _remove_stale_tmp(path: Path) -> None:
    """Delete the temporary files of merges that were killed (their process is gone; `.NAME.PID.tmp`)."""
    from pretrain.shards import _alive

    for p in path.glob(".*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if not _alive(pid):
            p.unlink(missing_ok=True)


def held_out(docs: list[str], valid_fraction: float, split_seed: int) -> np.ndarray:
    """(D,) bool: the documents of a corpus that prepare holds out for validation (the hash rule of
    pretrain/workers.py and the one-document fallback above), for tests and tools that hold the texts."""
    from pretrain.workers import is_valid, split_hashes

    h = split_hashes([d.encode("utf-8") for d in docs], split_seed)
    valid = is_valid(h, valid_fraction)
    if len(docs) >= 2 and not valid.any():
        valid[int(h.argmin())] = True
    elif len(docs) >= 2 and valid.all():
        valid[int(h.argmax())] = False
    return valid
