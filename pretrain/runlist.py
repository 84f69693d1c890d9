"""What run folders say about their runs, read from their files (no model is loaded): `pretrain runs` lists them,
`pretrain report` draws them, and `pretrain eval` picks where its results go.

A run's records are the lines of metrics.jsonl. A resumed run may have logged some steps twice (an interrupted
session logged past its newest checkpoint, then the resumed one logged those steps again); the later session's
records win (`merge_sessions`). A run's state:
    running   a session is training it now (RUN/.running names a live process; the trainer holds `running`)
    finished  summary.json covers its last logged step
    stopped   interrupted with every logged step checkpointed (Ctrl-C): `pretrain run --resume` continues it
    crashed   neither: its process died, or a non-finite loss stopped it, past its newest checkpoint
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.run import RunDir, write_json

GENERIC = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "eval_tokens", "step", "split", "checkpoint",
           "data")  # what every evaluation reports; the rest are the objective's own terms


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when it is absent; a UserError naming it when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete or repair it") from None
    return obj if isinstance(obj, dict) else {}


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records with the sessions of a resumed run merged; a line that does not parse (the half
    written last line of a run still training) is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
    return merge_sessions(records)


def merge_sessions(records: list[dict]) -> list[dict]:
    """Drop what a later session logged again: a record whose step is below one already seen, or that repeats a
    (split, step), starts a new session, and every earlier record from its step on is superseded."""
    out: list[dict] = []
    seen: set[tuple[str, int]] = set()
    top = -1
    for rec in records:
        key = (rec.get("split", "train"), rec["step"])
        if rec["step"] < top or key in seen:
            out = [r for r in out if r["step"] < rec["step"]]
            seen = {(r.get("split", "train"), r["step"]) for r in out}
            top = max((r["step"] for r in out), default=-1)
        out.append(rec)
        seen.add(key)
        top = max(top, rec["step"])
    return out


def count_parameters(weights: Path) -> int | None:
    """Parameters in a safetensors file, from its JSON header alone (shared tensors are stored once)."""
    try:
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return None
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            size = 1
            for d in entry.get("shape", []):
                size *= d
            total += size
    return total


@contextlib.contextmanager
def running(run: RunDir) -> Iterator[None]:
    """Mark the run as trained by this process while the block runs (RUN/.running holds its pid and host)."""
    write_json(run.running, {"pid": os.getpid(), "host": socket.gethostname()})
    try:
        yield
    finally:
        run.running.unlink(missing_ok=True)


def _alive(lock: dict) -> bool:
    """Whether the process a RUN/.running names still runs (on another host: assumed so)."""
    if lock.get("host") != socket.gethostname() or not isinstance(lock.get("pid"), int):
        return True
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunInfo:
    """One run folder as its files describe it (see the module docstring)."""

    run: RunDir
    config: dict  # config.json as saved (the resolved config, "sources", "notes")
    summary: dict  # summary.json; {} while training, after a crash or an interrupt
    records: list[dict]  # metrics.jsonl, sessions merged

    @cached_property
    def train(self) -> list[dict]:
        """The training records, in step order."""
        return [r for r in self.records if "split" not in r]

    @cached_property
    def valid(self) -> list[dict]:
        """The validation records, in step order."""
        return [r for r in self.records if r.get("split") == "valid"]

    @property
    def objective(self) -> str:
        """The registry name of the run's objective."""
        return str(self.config.get("objective", {}).get("name", "?"))

    @property
    def recipe(self) -> str:
        """The recipe the run started from ("-" for none)."""
        return str(self.config.get("recipe") or "-")

    @cached_property
    def checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, if any."""
        from pretrain.checkpoint import list_checkpoints

        found = list_checkpoints(self.run.checkpoints)
        return found[-1] if found else None

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the newest checkpoint, if any."""
        return int(self.checkpoint.name.split("_")[-1]) if self.checkpoint else None

    @property
    def steps(self) -> int:
        """Optimizer steps done, as far as the files tell."""
        return max([self.summary.get("steps", 0), self.checkpoint_step or 0, *(r["step"] for r in self.train)])

    @property
    def tokens(self) -> int:
        """Input tokens trained on, as far as the files tell."""
        return int(self.summary.get("tokens") or (self.train[-1]["tokens"] if self.train else 0))

    @property
    def seconds(self) -> float:
        """Training time so far (evaluations included; tokenizer and cache not)."""
        return float(self.summary.get("seconds") or (self.train[-1].get("elapsed", 0.0) if self.train else 0.0))

    @cached_property
    def params(self) -> int | None:
        """Parameters of the model, from the newest checkpoint's weights file."""
        return count_parameters(self.checkpoint / "model.safetensors") if self.checkpoint else None

    @cached_property
    def evals(self) -> dict[str, dict]:
        """Every `pretrain eval` result in the folder: file name -> results (eval.json: the run's own data)."""
        paths = [self.run.eval, *sorted(self.run.path.glob(self.run.eval_for("*").name))]
        return {p.name: _read_json(p) for p in paths if p.is_file()}

    @cached_property
    def probes(self) -> dict[str, dict]:
        """Every `pretrain probe` result in the folder: task -> results."""
        return {p.stem[len("probe-"):]: _read_json(p) for p in sorted(self.run.path.glob(self.run.probe_for("*").name))}

    @cached_property
    def state(self) -> str:
        """running, finished, stopped or crashed (see the module docstring)."""
        lock = _read_json(self.run.running) if self.run.running.exists() else None
        if lock is not None:
            return "running" if _alive(lock) else "crashed"
        last = self.train[-1]["step"] if self.train else 0
        if self.summary and self.summary.get("steps", -1) >= last:
            return "finished"
        return "stopped" if self.checkpoint_step is not None and self.checkpoint_step >= last else "crashed"


def read_run(path: Path) -> RunInfo:
    """The run in folder `path`; a UserError naming it when it is no run folder."""
    run = RunDir(path)
    if not run.config.is_file():
        hint = ""
        if run.path.is_dir() and any(RunDir(p).config.is_file() for p in run.path.iterdir() if p.is_dir()):
            hint = f" but holds runs: give them, e.g. {run.path}/*"
        elif any(c in str(path) for c in "*?["):
            hint = ": no folder matches that pattern"
        raise UserError(f"{path} is not a run folder (no config.json){hint or '; give folders `pretrain run` wrote'}")
    return RunInfo(run, _read_json(run.config), _read_json(run.summary), read_records(run.metrics))


def list_runs(root: Path) -> list[RunInfo]:
    """The runs in the folders under `root`, by name; a UserError when `root` is no folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds the runs (default: runs)")
    return [read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and RunDir(p).config.is_file()]


# ---------------------------------------------------------------------------------------------- eval output


def data_name(source: str) -> str:
    """A file-name-safe name of a data source: its file's stem, folder or dataset name (a glob: its folder)."""
    p = Path(source.rstrip("/"))
    while any(c in p.name for c in "*?[") and p.name:
        p = p.parent
    return re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem).strip("-.") or "data"


def eval_target(run: RunDir, source: str, own: str, split: str, out: Path | None) -> Path:
    """Where `pretrain eval` writes its results on data `source` ("" = the built-in corpus) of a run trained on
    `own`: RUN/eval.json on the run's own data, RUN/eval-NAME.json on other data, `-train` added for the train
    split; `--out` is a .json file, or a folder for that name. A file holding another evaluation (other data or
    another split) is never overwritten: the new name gets a short hash; a file that is no evaluation is refused."""
    same = source == own or (bool(source) and bool(own) and Path(source).resolve() == Path(own).resolve())
    other, label = (None if same else source), source or "built-in corpus"
    parts = ([data_name(other)] if other else []) + ([split] if split != "valid" else [])
    target = run.eval_for("-".join(parts)) if parts else run.eval
    if out is not None:
        if out.suffix == ".json":
            target = out
        elif out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder or a .json file name")
        else:
            target = out / target.name
    if target.exists():
        old = _read_json(target) if target.is_file() else {}
        if "checkpoint" not in old or "split" not in old:
            raise UserError(f"{target} exists and is not an evaluation result; choose another --out")
        if (old.get("data"), old.get("split")) != (label, split):
            tag = hashlib.sha256(f"{label}:{split}".encode()).hexdigest()[:6]
            target = target.with_name(f"{target.stem}-{tag}.json")
    return target


def format_count(value: Any) -> str:
    """1234567 -> 1.23M, for tables of runs."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
