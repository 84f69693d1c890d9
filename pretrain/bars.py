"""Progress bars of the data path: bytes/s, documents/s, tokens/s and an ETA when the size is known."""

from __future__ import annotations

import time


class Bars:
    """Rich progress bars, started on first use so that a reused cache prints nothing."""

    def __init__(self, enabled: bool, console):
        self.enabled, self.console, self.progress = enabled, console, None
        self.seen: dict = {}

    def task(self, description: str, total: int | None):
        """Add a bar (total None: an activity without a known size, shown pulsing)."""
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description:<11}"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, disable=not self.enabled)
            self.progress.start()
        task = self.progress.add_task(description, total=total, rates="")
        self.seen[task] = [time.perf_counter(), 0, 0, 0]  # start, bytes, documents, tokens
        return task

    def advance(self, task, units: int, *, nbytes: int = 0, docs: int = 0, tokens: int = 0) -> None:
        """Move a bar by `units` and show the rates since it started."""
        s = self.seen[task]
        s[1] += nbytes
        s[2] += docs
        s[3] += tokens
        dt = max(time.perf_counter() - s[0], 1e-9)
        rates = f"{s[1] / dt / 1e6:.1f} MB/s {s[2] / dt:,.0f} docs/s" + (f" {s[3] / dt:,.0f} tok/s" if s[3] else "")
        self.progress.update(task, advance=units, rates=rates)

    def finish(self, task) -> None:
        """Show a bar as done."""
        t = self.progress.tasks[[x.id for x in self.progress.tasks].index(task)]
        self.progress.update(task, total=t.completed or 1, completed=t.completed or 1)

    def close(self) -> None:
        """Stop drawing."""
        if self.progress is not None:
            self.progress.stop()
