"""Benchmarks: batch-construction throughput of every objective on one thread.

Batches are drawn from the real token cache of the data (the built-in corpus by default) with the real
tokenizer, exactly as training draws them; figures are input tokens (input_ids entries) per second.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console


def time_batches(objective: Any, split: Any, vocab: Any, batch_size: int, seq_len: int, seconds: float) -> dict:
    """Best-of-rounds throughput of `objective.batch` on the current thread settings."""
    from objectives.base import make_generator

    for i in range(3):  # warm up caches and lazy tensors
        objective.batch(split, vocab, make_generator(0, "bench", i), batch_size, seq_len)
    best, n_tokens, total = float("inf"), 0, 0.0
    i = 0
    while total < seconds or i < 5:
        t0 = time.perf_counter()
        b = objective.batch(split, vocab, make_generator(0, "bench", i), batch_size, seq_len)
        dt = time.perf_counter() - t0
        best, total, i = min(best, dt), total + dt, i + 1
        n_tokens = b["input_ids"].numel()
    return {"batches": i, "input_tokens": n_tokens, "best_ms": best * 1e3, "mean_ms": total / i * 1e3,
            "tokens_per_s": n_tokens / (total / i), "best_tokens_per_s": n_tokens / best}


def bench_batches(names: list[str] | None, batch_size: int, seq_len: int, seconds: float, source: str | None,
                  console: Console) -> list[dict]:
    """Time every (or the named) objective's batch construction on one thread; print and return a table."""
    import torch

    from objectives import OBJECTIVES
    from pretrain.config import DataConfig, objective_class
    from pretrain.data import prepare
    from pretrain.metrics import table

    prepared = prepare(DataConfig(source=source or ""), progress=True, console=console)
    split, vocab = prepared.cache.split("train"), prepared.tokenizer.vocab
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name in names or list(OBJECTIVES):
            obj = objective_class(name)()
            r = time_batches(obj, split, vocab, batch_size, seq_len, seconds)
            rows.append({"objective": name, **r})
    finally:
        torch.set_num_threads(threads)
    console.print(table(f"batch construction, 1 thread, batch {batch_size} x {seq_len} (input tokens/s)",
                        [(r["objective"], r["input_tokens"], r["mean_ms"], r["tokens_per_s"], r["best_tokens_per_s"])
                         for r in rows], ("objective", "tokens/batch", "mean ms", "tokens/s", "best tokens/s")))
    return rows
