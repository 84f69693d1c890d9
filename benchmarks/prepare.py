"""`pretrain bench prepare`: the data path at scale, measured the way a user meets it.

Corpus: the built-in corpus (the standard library's docstrings, ~1.5 MB; pretrain/corpus.py) repeated with
per-copy word changes (each copy swaps a seeded fifth of its distinct words, outside the 200 most frequent,
for other words of the corpus), so the tokenizer never sees pure repeats. It is written once as one .txt file
of blank-line-separated documents (one docstring each); smaller sizes are prefixes of it, cut at a document.

1. Memory: `pretrain prepare` (tokenizer trained on its sample, cache built) of each size, each in a fresh
   Python process that reports its own peak RSS (`resource.getrusage(RUSAGE_SELF)`) and that of its worker
   processes (`RUSAGE_CHILDREN`, the largest worker). Acceptance: both <= 1 GB, and the largest size's
   <= 1.5x the smallest's.
2. Speed: tokenizing the timing size with each worker count, the tokenizer given (training excluded);
   tokens/s of the tokenize pass and the speed-up over one worker (>= 1.7x on 2 cores).
3. Training: `pretrain run` (gpt2-tiny) on the largest cache and on the built-in corpus: seconds from launch
   to the first logged step, and the peak RSS of the run's processes sampled from /proc while it trains.
Figures go to the console and to OUT/bench-prepare.json. Timings need a quiet machine; memory does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

GENERATOR_VERSION = 2  # bump when the corpus generator changes: generated files are then rewritten
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    """'20MB' -> 20_000_000 (decimal units KB, MB, GB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB)\s*", text.upper())
    if not m:
        raise UserError(f"size {text!r} must look like 20MB or 1GB")
    return int(float(m[1]) * UNITS[m[2]])


def make_corpus(path: Path, size: int, seed: int = 0) -> None:
    """Write `size` bytes (cut at a document) of the built-in corpus repeated with per-copy word changes."""
    from pretrain import corpus

    docs = [d.replace("\n\n", "\n") for d in corpus.stdlib_documents()]  # one docstring, one document
    parts = re.split(r"(\w+)", "\n\n".join(docs) + "\n\n")  # (P,) separators at even, words at odd positions
    words = np.array(parts[1::2], dtype=object)
    vocab, ids = np.unique(words, return_inverse=True)  # (V,), (W,)
    frequent = np.argsort(-np.bincount(ids))[:200]  # function words stay: the text keeps its statistics
    out = np.array(parts, dtype=object)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written, copy = 0, 0
        while written < size:
            rng = np.random.default_rng([seed, copy])
            mapping = np.arange(len(vocab))
            swap = rng.random(len(vocab)) < 0.2
            swap[frequent] = False
            mapping[swap] = rng.integers(0, len(vocab), int(swap.sum()))
            out[1::2] = vocab[mapping[ids]]
            text = "".join(out.tolist())
            data = text.encode("utf-8")
            if written + len(data) > size:  # the last copy: cut after its last document that fits
                f.write(data[: data.rfind(b"\n\n", 0, size - written) + 2].decode("utf-8"))
                break
            f.write(text)
            written += len(data)
            copy += 1
    os.replace(tmp, path)


def corpus_file(out: Path, size: int, biggest: Path | None) -> Path:
    """OUT/corpus-SIZE.txt: generated (the biggest) or a prefix of the biggest, cut at a document; reused
    when it was written by this generator version."""
    path = out / f"corpus-{size}.txt"
    stamp = path.with_suffix(".json")
    want = {"version": GENERATOR_VERSION, "size": size}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    if biggest is None:
        make_corpus(path, size)
    else:
        with open(biggest, "rb") as src:
            data = src.read(size)
        path.write_bytes(data[: data.rfind(b"\n\n") + 2])
    stamp.write_text(json.dumps(want))
    return path


def child_prepare(spec: dict) -> dict:
    """In a fresh process: prepare `spec` and report its figures, the peak RSS of this process
    (`getrusage`), the peak RSS of its largest worker (VmHWM: `getrusage(RUSAGE_CHILDREN)` would count the
    parent's pages a spawned worker shares before its exec), and the peak of the whole tree's PSS (shared
    pages counted once), sampled every 50 ms, in MB."""
    import resource
    import threading

    from pretrain.config import DataConfig
    from pretrain.data import prepare

    peaks, stop = {"worker": 0.0, "tree": 0.0}, threading.Event()

    def sample() -> None:
        """Record the peaks until told to stop."""
        while not stop.wait(0.05):
            tree = _tree(os.getpid())
            peaks["worker"] = max([peaks["worker"], *(_status_mb(q, "VmHWM") for q in tree if q != os.getpid())])
            peaks["tree"] = max(peaks["tree"], sum(_pss_mb(q) for q in tree))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    prep = prepare(DataConfig(**spec), progress=False)
    stop.set()
    sampler.join()
    keep = ("documents", "sentences", "tokens", "bytes", "shards", "workers", "tokens_per_s", "tokenize_seconds",
            "read_seconds", "tokenizer_seconds", "tokenizer_path", "path", "reused")
    return {**{k: prep.stats[k] for k in keep}, "seconds": time.perf_counter() - t,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "worker_rss_mb": peaks["worker"],
            "tree_pss_mb": peaks["tree"]}


def measure_prepare(spec: dict) -> dict:
    """`child_prepare(spec)` in a fresh Python process."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.prepare", json.dumps(spec)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise UserError(f"the benchmark's prepare failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tree(pid: int) -> set[int]:
    """A process and all its descendants, from /proc."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {pid}, True
    while grew:
        more = {q for q, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _status_mb(pid: int, field: str) -> float:
    """A memory field of /proc/PID/status (VmRSS, VmHWM) in MB; 0 when the process is gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def _pss_mb(pid: int) -> float:
    """Proportional set size (shared pages divided among their users) of a process in MB; 0 when gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if x.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def measure_run(data: Path | None, cache: Path, run_dir: Path, steps: int) -> dict:
    """`pretrain run` (gpt2-tiny) of `steps` steps: seconds from launch to the first logged step, and the
    peak memory of its process tree (PSS: the DataLoader worker's pages shared with the trainer count once)
    sampled every 0.1 s while it trains (until its last step is logged)."""
    args = [sys.executable, "-m", "pretrain.cli", "run", "--objective", "clm", "--max-steps", str(steps), "--out",
            str(run_dir), *[a for kv in ("train.log_every=1", "train.eval_every=0", f"data.cache_dir={cache}")
                            for a in ("--set", kv)], *(["--data", str(data)] if data else [])]
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, peak, metrics = None, 0.0, run_dir / "metrics.jsonl"
    while proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and first is None:
            first = time.perf_counter() - t0
        if len(lines) >= steps:
            break  # training is over: what follows (eval, checkpoint, the baseline) is not training memory
        peak = max(peak, sum(_pss_mb(q) for q in _tree(proc.pid)))
        time.sleep(0.1)
    proc.wait()
    if proc.returncode != 0:
        raise UserError(f"the benchmark's run failed: {(proc.stderr.read().strip().splitlines() or ['?'])[-1]}")
    return {"first_step_s": first, "train_rss_mb": peak}


def run_benchmark(out: Path, sizes: str, workers: str, timing_size: str, console) -> dict:
    """The three measurements of the module docstring; prints tables and writes OUT/bench-prepare.json."""
    from pretrain.metrics import table

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    order = sorted({parse_size(s) for s in sizes.split(",")} | {parse_size(timing_size)})
    big = corpus_file(out, order[-1], None)
    files = {s: corpus_file(out, s, big) if s != order[-1] else big for s in order}
    report: dict = {"memory": {}, "speed": {}, "run": {}}
    for s in sorted(parse_size(x) for x in sizes.split(",")):
        cache = out / f"cache-{s}"
        shutil.rmtree(cache, ignore_errors=True)  # a fresh prepare: tokenizer and cache built
        report["memory"][s] = measure_prepare({"source": str(files[s]), "cache_dir": str(cache)})
    rows = [(f"{s / 1e6:,.0f} MB", m["tokens"], m["shards"], f"{m['rss_mb']:.0f}", f"{m['worker_rss_mb']:.0f}",
             f"{m['tree_pss_mb']:.0f}", f"{m['seconds']:.0f}") for s, m in report["memory"].items()]
    console.print(table("prepare: peak memory", rows, ("corpus", "tokens", "shards", "RSS MB", "worker RSS MB",
                                                       "all processes MB", "seconds")))
    tok = report["memory"][min(report["memory"])]["tokenizer_path"]
    for w in (int(x) for x in workers.split(",")):
        cache = out / f"cache-speed-{w}"
        shutil.rmtree(cache, ignore_errors=True)
        report["speed"][w] = measure_prepare({"source": str(files[parse_size(timing_size)]), "cache_dir": str(cache),
                                              "tokenizer": tok, "workers": w})
    one = report["speed"].get(1, next(iter(report["speed"].values())))["tokens_per_s"]
    rows = [(w, f"{m['tokens_per_s']:,.0f}", f"{m['tokens_per_s'] / one:.2f}x", f"{m['tokenize_seconds']:.1f}")
            for w, m in report["speed"].items()]
    console.print(table(f"tokenizing {parse_size(timing_size) / 1e6:,.0f} MB", rows, ("workers", "tokens/s",
                                                                                       "speed-up", "seconds")))
    largest = max(report["memory"])
    measure_prepare({"source": "", "cache_dir": str(out / "cache-builtin")})  # the run below reuses it
    measure_run(None, out / "cache-builtin", out / "run-builtin", 2)  # warm-up: the first run of a session is slow
    report["run"]["builtin"] = measure_run(None, out / "cache-builtin", out / "run-builtin", 30)
    report["run"]["largest"] = measure_run(files[largest], out / f"cache-{largest}", out / "run-largest", 30)
    for name in ("largest", "builtin"):
        shutil.rmtree(out / f"run-{name}", ignore_errors=True)
    rows = [(k, f"{v['first_step_s']:.1f}", f"{v['train_rss_mb']:.0f}") for k, v in report["run"].items()]
    console.print(table("pretrain run (gpt2-tiny)", rows, ("corpus", "first step after s", "training RSS MB")))
    (out / "bench-prepare.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    print(json.dumps(child_prepare(json.loads(sys.argv[1]))))
