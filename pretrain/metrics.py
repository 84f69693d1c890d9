"""Running means of (sum, count) terms, metrics.jsonl on disk, and the rich tables on screen."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.table import Table


class Meter:
    """Accumulates (sum, count) pairs per metric name; `means()` gives sum/count for each."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, terms: dict[str, tuple[Any, Any]]) -> None:
        for name, (s, n) in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(s)
            self.counts[name] = self.counts.get(name, 0.0) + float(n)

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


class JsonlLog:
    """Appends one JSON object per line to a file (rank 0 only), flushed at once so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def fmt(value: Any) -> str:
    """A number as people read it in a table: 4 significant digits, thousands separators for counts."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def table(title: str, rows: dict[str, Any] | list[tuple], columns: tuple[str, ...] = ("metric", "value")) -> Table:
    """A two-or-more-column rich table from a dict (metric -> value) or a list of row tuples."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    items = rows.items() if isinstance(rows, dict) else rows
    for row in items:
        t.add_row(*(fmt(v) for v in row))
    return t


def measure_peak_flops(device: Any, dtype: Any) -> float:
    """This machine's dense matmul throughput (FLOP/s) in the run's precision, measured in ~0.3 s: the
    denominator of the model FLOPs utilization (MFU) the trainer reports."""
    import torch

    n = 1024 if device.type == "cpu" else 4096
    dt = dtype or torch.float32
    g = torch.Generator(device).manual_seed(0)  # own generator: the global RNG drives dropout and must stay put
    a, b = (torch.randn(n, n, device=device, dtype=dt, generator=g) for _ in range(2))
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > 0.3:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0)
