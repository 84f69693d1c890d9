"""Batch construction beside the per-example reference peer, in one run (`pretrain bench`).

Every objective's vectorized `batch` and its per-example reference peer (`benchmarks/peers.py`: BERT, T5,
fairseq, nanoGPT) draw batches of the same shape from the same token cache (the built-in corpus by default)
with the same vocabulary, on one thread. Throughput counts the nominal batch, batch_size x seq_len tokens
(padding included, identical for both sides, so a denoising batch counts 64 x 512 however its source was
padded); an objective with a fixed raw window (`Objective.raw_window`: T5 reads 568 raw tokens for 512
inputs) also reports batch_size x that window. Targets are the speeds we hold ourselves to (10M tokens/s for
every objective, packed or not). Beside them, the non-padding share of the positions each side's batches have
the model compute (an encoder-decoder's decoder too: `objectives.base.computed_positions`): on short documents
(the built-in corpus averages ~60 tokens a docstring) BERT pairs at 512 are mostly padding, and ours and the peer
need not fill alike.

The process keeps freed memory mapped (`pretrain.runtime.keep_freed_memory`), as the trainer does before it
forks its DataLoader workers, so batches are timed as the workers build them; the peers gain from it alike.
Without it a denoising batch takes ~10% longer (its few dozen batch-sized tensors fault their pages in anew).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console


def time_fn(make: Callable[[int], Any], seconds: float, warmup: int = 1, min_rounds: int = 3) -> dict:
    """Call make(i) -> batch for i = 0, 1, ... until `seconds` have passed and at least `min_rounds` calls were
    timed (after `warmup` untimed calls); returns rounds, the mean and best seconds per call and the real
    (non-padding) share of the positions the model computes (`objectives.base.computed_positions`: an
    encoder-decoder's decoder too), counted outside the timing."""
    from objectives.base import computed_positions

    for i in range(warmup):
        make(-1 - i)
    best, total, real, positions, i = float("inf"), 0.0, 0, 0, 0
    while total < seconds or i < min_rounds:
        t0 = time.perf_counter()
        b = make(i)
        dt = time.perf_counter() - t0
        n_real, n_pos = computed_positions(b)
        best, total, real, positions, i = min(best, dt), total + dt, real + n_real, positions + n_pos, i + 1
    return {"rounds": i, "mean_s": total / i, "best_s": best, "fill": real / positions}


def time_batches(objective: Any, split: Any, vocab: Any, batch_size: int, seq_len: int, seconds: float) -> dict:
    """Mean and best seconds per `objective.batch` call on the current thread settings."""
    from objectives.base import make_generator

    return time_fn(lambda i: objective.batch(split, vocab, make_generator(0, "bench", i), batch_size, seq_len),
                   seconds, warmup=3, min_rounds=5)


def time_peer(peer: Callable, split: Any, vocab: Any, batch_size: int, seq_len: int, seconds: float) -> dict:
    """Mean and best seconds per peer batch (peer(split, vocab, rng, B, T), see benchmarks/peers.py)."""
    import numpy as np

    return time_fn(lambda i: peer(split, vocab, np.random.default_rng(i + 1), batch_size, seq_len), seconds)


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.2f}M"


def _fill(r: dict) -> str:
    if ", raw " in r["objective"]:  # the raw-window row of an objective that reports one
        return "—"
    return f"{r['ours_fill']:.0%}" + ("" if r["peer_fill"] is None else f" / {r['peer_fill']:.0%}")


def bench_batches(names: list[str] | None, batch_size: int, seq_len: int, seconds: float, source: str | None,
                  console: Console | None, *, split: Any = None, vocab: Any = None, peers: bool = True) -> list[dict]:
    """Time every (or the named) objective's batch construction beside its peer, on one thread; print one
    table (when given a console) and return its rows. `split`/`vocab` replace the prepared corpus (tests).

    Row keys: objective, tokens_per_batch, ours_tokens_per_s, ours_best_tokens_per_s, peer,
    peer_tokens_per_s, speedup (ours / peer, None without a peer), target (tokens/s or None), meets,
    ours_fill and peer_fill (mean non-padding share of the nominal batch: short documents leave BERT pairs
    mostly padding, and the two sides need not pad alike).
    """
    import torch

    from benchmarks.peers import PEERS, TARGETS
    from objectives import OBJECTIVES
    from pretrain.config import DataConfig, objective_class
    from pretrain.runtime import keep_freed_memory

    # The mixture builds its rows with its components' batch code, timed under their own names; its UL2 default
    # needs more sentinels at 512 than the tokenizer has.
    names = names or [n for n in OBJECTIVES if n != "mixture"]
    if split is None or vocab is None:
        from pretrain.data import prepare

        pieces = tuple(dict.fromkeys(p for n in names for p in objective_class(n)().special_pieces))
        prepared = prepare(DataConfig(source=source or ""), extra_pieces=pieces, progress=console is not None,
                           console=console)
        split, vocab = prepared.cache.split("train"), prepared.tokenizer.vocab
    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, obj in variants(names):
            ours = time_batches(obj, split, vocab, batch_size, seq_len, seconds)
            peer_fn, peer_name = PEERS.get(obj.name, (None, "—")) if peers and name == obj.name else (None, "—")
            peer = time_peer(peer_fn, split, vocab, batch_size, seq_len, seconds) if peer_fn else None
            counts = [(name, batch_size * seq_len)]
            raw = obj.raw_window(seq_len)
            if raw is not None:  # it corrupts raw windows longer than its inputs (T5: 568 for 512)
                counts.append((f"{name}, raw {raw}", batch_size * raw))
            for label, n_tok in counts:
                target = TARGETS.get(obj.name)
                ours_tps = n_tok / ours["mean_s"]
                rows.append({
                    "objective": label, "tokens_per_batch": n_tok,
                    "ours_tokens_per_s": ours_tps, "ours_best_tokens_per_s": n_tok / ours["best_s"],
                    "peer": peer_name, "peer_tokens_per_s": n_tok / peer["mean_s"] if peer else None,
                    "speedup": peer["mean_s"] / ours["mean_s"] if peer else None,
                    "target": target, "meets": None if target is None else ours_tps >= target,
                    "ours_fill": ours["fill"], "peer_fill": peer["fill"] if peer else None,
                })
    finally:
        torch.set_num_threads(threads)
    if console is not None:
        _print(rows, batch_size, seq_len, seconds, console)
    return rows


def variants(names: list[str]) -> list[tuple[str, Any]]:
    """(label, objective) to time: each objective with its defaults, then, where it has a packing switch, with
    that switch on ("mlm, pack"), which the packed training path builds batches with."""
    import dataclasses

    from objectives.packing import SWITCHES
    from pretrain.config import objective_class

    out = []
    for name in names:
        obj = objective_class(name)()
        out.append((name, obj))
        fields = {f.name for f in dataclasses.fields(obj)}
        out += [(f"{name}, {k}", dataclasses.replace(obj, **{k: True})) for k in SWITCHES if k in fields]
    return out


def _print(rows: list[dict], batch_size: int, seq_len: int, seconds: float, console: Console) -> None:
    """The table of `bench_batches` rows."""
    from pretrain.metrics import table

    console.print(table(
        f"batch construction, 1 thread, batch {batch_size} x {seq_len}, tokens/s (mean over >= {seconds:g} s each)",
        [(r["objective"], r["tokens_per_batch"], _rate(r["ours_tokens_per_s"]), _rate(r["peer_tokens_per_s"]),
          "—" if r["speedup"] is None else f"{r['speedup']:.1f}x", _rate(r["target"]),
          {None: "—", True: "yes", False: "NO"}[r["meets"]], _fill(r), r["peer"]) for r in rows],
        ("objective", "tokens/batch", "ours", "peer", "speed-up", "target", "meets", "non-pad ours/peer",
         "peer (per example)")))
