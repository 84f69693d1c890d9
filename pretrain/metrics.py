"""Running means of (sum, count) terms, metrics.jsonl on disk (and the TensorBoard / W&B streams beside it,
pretrain/tracking.py), the training progress (`TrainLog`), the rich tables on screen, and the matmul peak that MFU
is measured against."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

    from pretrain.checkpoint import TrainState
    from pretrain.config import Config
    from pretrain.run import RunDir
    from pretrain.runtime import Engine


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
    """A two-or-more-column rich table from a dict (metric -> value) or a list of row tuples. Title and cells
    are plain text, never markup: a path or value holding `[/x]` prints as written."""
    from rich.text import Text

    t = Table(title=Text(title), title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    items = rows.items() if isinstance(rows, dict) else rows
    for row in items:
        t.add_row(*(Text(fmt(v)) for v in row))
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


class TrainLog:
    """What the training loop reports, in one place: the progress bar, metrics.jsonl and the `train.report_to`
    streams (rank 0 only: `run` is None on the others), the interval timing behind tokens/s and MFU, and the
    figures of the run summary.

    MFU = training FLOPs per input token (`Transformer.flops_per_token`, the decoder length from the
    objective) x tokens/s per rank / the dense matmul peak measured at start in the run's precision. An
    interval's tokens/s and MFU count training time only: evaluation and checkpoints are left out (`paused`),
    so an interval holding one no longer reads as half the speed; the run summary's tokens/s is over wall time.
    """

    def __init__(self, cfg: Config, engine: Engine, run: RunDir | None, console: Console, state: TrainState,
                 horizon: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from pretrain.tracking import Trackers

        rt, tc, start = engine.rt, cfg.train, state.step
        self.rt = rt
        self.jsonl = JsonlLog(run.metrics) if run is not None else None
        self.trackers = Trackers(cfg, run, state, console)
        self.peak = measure_peak_flops(rt.device, rt.amp_dtype)
        seq_len = cfg.data.seq_len
        self.flops_per_token = engine.model.flops_per_token(seq_len, cfg.objective.decoder_length(seq_len))
        self.world, self.log_every = rt.world, tc.log_every
        self.main_term = next(iter(cfg.objective.loss_terms))
        self.meter, self.records = Meter(), []  # records: this session's log records, for the summary
        self.interval_t, self.interval_tok = time.perf_counter(), 0
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not rt.main)
        self.task = self.progress.add_task(cfg.objective.name, total=horizon, completed=start, info="")

    def __enter__(self) -> TrainLog:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        self.trackers.close()

    def set_horizon(self, horizon: int) -> None:
        """The progress bar's end, once a time budget's horizon is known."""
        self.progress.update(self.task, total=horizon)

    def on_micro(self, step: int, n: int, then=lambda: None):
        """A callback for micro-batch i (1-based) of the n of optimizer step `step`: long accumulations show life;
        it calls `then()` after updating the bar."""

        def show(i: int) -> None:
            self.progress.update(self.task, completed=step + i / n)
            then()

        return show

    def step(self, state: TrainState, lr: float, grad_norm: float, tokens: int, last: bool = False) -> None:
        """Count a finished step of `tokens` input tokens; every log_every steps (and at the `last` step) write
        a record of the interval's means, learning rate, gradient norm, tokens/s and MFU."""
        self.interval_tok += tokens
        if state.step % self.log_every and not last:
            return
        dt = time.perf_counter() - self.interval_t
        rec = {"step": state.step, "tokens": state.tokens, **self._means(), "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": self.interval_tok / dt,
               "mfu": self.flops_per_token * self.interval_tok / dt / self.world / self.peak,
               "elapsed": state.elapsed}
        if self.jsonl:
            self.jsonl.write(rec)
        self.trackers.write(rec)
        self.records.append(rec)
        self.progress.update(self.task, completed=state.step, info=f"loss {rec.get(self.main_term, math.nan):.4f} "
                             f"lr {lr:.2e} {rec['tokens_per_s']:,.0f} tok/s mfu {rec['mfu']:.1%}")
        self.meter, self.interval_t, self.interval_tok = Meter(), time.perf_counter(), 0

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (an evaluation, a checkpoint) out of the interval's tokens/s and MFU."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.interval_t += time.perf_counter() - t0

    def _means(self) -> dict[str, float]:
        """The interval's mean of every term over all ranks (every rank calls this at the same steps)."""
        from pretrain.parallel import all_keys, all_sum

        m = self.meter
        keys = all_keys(list(m.sums), self.rt)
        totals = all_sum([m.sums.get(k, 0.0) for k in keys] + [m.counts.get(k, 0.0) for k in keys], self.rt)
        return {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys) if totals[len(keys) + i] > 0}

    def eval(self, state: TrainState, res: dict) -> None:
        """Write a `split: valid` record and print one line. Its "tokens" are the input tokens trained on so far,
        as in every record; "eval_tokens" the targets evaluated (evaluate's "tokens")."""
        rec = {"step": state.step, "split": "valid", **res, "tokens": state.tokens, "eval_tokens": res["tokens"]}
        self.trackers.write(rec)
        if self.jsonl:
            self.jsonl.write(rec)
            self.progress.console.print(f"step {state.step:>6}  valid loss {res['loss']:.4f}  ppl "
                                        f"{res['perplexity']:.2f}  bits/byte {res['bits_per_byte']:.3f}")

    def summary(self) -> dict:
        """The training figures of the run summary: last logged loss, mean MFU, the measured peak."""
        recs = self.records
        return {"train_loss": (recs[-1] if recs else {}).get(self.main_term, math.nan),
                "mfu": sum(r["mfu"] for r in recs) / len(recs) if recs else math.nan, "peak_flops": self.peak}
