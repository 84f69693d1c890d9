"""The run folder, in one place: its files, creating a run, reading its config, building its model, and
loading a trained model from it (`load`, used by eval and generate; the trainer's resume uses the same
pieces, then restores the optimizer too).

    RUN/config.json                 the resolved config, plus where each non-default value came from ("sources")
                                    and what was decided during the run ("notes": a time budget's horizon)
    RUN/tokenizer.model             a copy of the run's tokenizer
    RUN/data.json                   the token cache's metadata (source, fingerprint, counts)
    RUN/metrics.jsonl               one JSON object per log step and per evaluation
    RUN/summary.json                what the run printed at its end
    RUN/eval.json                   written by `pretrain eval` (RUN/eval-NAME.json: on other data)
    RUN/probe-TASK.json             written by `pretrain probe` (pretrain/probe.py)
    RUN/tensorboard/                TensorBoard event files (train.report_to), against steps/ and tokens/
    RUN/.running                    while a session trains: its pid and host (pretrain/runlist.py reads it)
    RUN/checkpoints/step_NNNNNNN/   safetensors weights + JSON state (pretrain/checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from pretrain.config import Config
    from pretrain.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.model"

    @property
    def data(self) -> Path:
        return self.path / "data.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # --- reports and listings (pretrain/tracking.py, pretrain/runlist.py) ---
    def eval_for(self, data_name: str) -> Path:
        """Where `pretrain eval` writes its results on other data than the run's own."""
        return self.path / f"eval-{data_name}.json"

    def probe_for(self, task: str) -> Path:
        """Where `pretrain probe` writes its results on a task."""
        return self.path / f"probe-{task}.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def running(self) -> Path:
        return self.path / ".running"
    # --- end reports and listings ---

    def holds_run(self) -> bool:
        """Whether `pretrain run` already started a run here."""
        return self.config.exists()

    def ours(self, name: str) -> bool:
        """Whether a top-level entry of the folder is one a run writes (so a restart may remove it)."""
        return name in OURS or name.startswith(("eval", "probe-", ".")) and name.endswith((".json", ".tmp"))


OURS = {"config.json", "tokenizer.model", "data.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard",
        ".running"}


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def create(run: RunDir, cfg: Config, sources: list, tokenizer: Path, cache: Path, data_meta: dict) -> None:
    """Start a run folder: the resolved config with its sources, the tokenizer and the data's metadata (with
    the key of the token cache, which a resume compares)."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(json.dumps({**cfg.to_dict(), "sources": sources}, indent=2))
    shutil.copyfile(tokenizer, run.tokenizer)
    run.data.write_text(json.dumps({"cache_key": Path(cache).name, **data_meta}, indent=2, default=str))


def check_new(run: RunDir) -> str | None:
    """Make sure a new run may start in `run.path` before any work is done; returns a note when a run there
    never saved a checkpoint and holds only files a run writes: it may be cleared (`clear`) to start again.
    A run with checkpoints, a non-empty folder that is no run, a file, or an unwritable place is a UserError."""
    from pretrain import checkpoint

    p = run.path
    if not p.exists():
        _check_creatable(p)
        return None
    if not p.is_dir():
        raise UserError(f"--out {p} is a file, not a folder; choose a new or empty folder")
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        return None
    if not run.holds_run():
        raise UserError(f"--out {p} is a non-empty folder that holds no run ({entries[0]}, ...); choose a new or "
                        "empty folder, so nothing in it is overwritten")
    if checkpoint.list_checkpoints(run.checkpoints):
        raise UserError(f"{p} already holds a run; continue it with --resume {p} or choose another --out")
    foreign = [e for e in entries if not run.ours(e)]
    if foreign:
        raise UserError(f"{p} holds a run that never saved a checkpoint, and {foreign[0]}, which no run wrote; move "
                        "it away or choose another --out")
    return f"{p} held a run that never saved a checkpoint; it starts again from scratch"


def clear(run: RunDir) -> None:
    """Remove what a run wrote into its folder (after `check_new` found only that there)."""
    for p in run.path.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_creatable(p: Path) -> None:
    """UserError unless the folder p could be created: its nearest existing parent is a writable folder."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {p}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {p}: {parent} is not writable (read-only or no permission); choose "
                        "another --out")


def keep_metrics_until(run: RunDir, step: int) -> None:
    """Drop the records after `step` from metrics.jsonl (a resume from checkpoint `step` logs them again)."""
    if not run.metrics.is_file():
        return
    lines = run.metrics.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and _record_step(ln) <= step]
    if len(kept) != len(lines):
        tmp = run.metrics.with_name(f".{run.metrics.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, run.metrics)


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed run: drop it
        return float("inf")


def load_config(run_dir: Path) -> Config:
    """The config a run was trained with (RUN/config.json); a UserError when the folder is not a run or the
    file is not a config."""
    from pretrain.config import config_from_dict

    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json); give the folder `pretrain run` wrote")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); it is not the config `pretrain run` wrote") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a config; it is not the file `pretrain run` wrote")
    raw.pop("sources", None)
    raw.pop("notes", None)
    try:
        return config_from_dict(raw)
    except UserError as e:
        raise UserError(f"{path} is not a valid run config: {e}") from None


def add_note(run: RunDir, name: str, note: Any) -> None:
    """Record in config.json's "notes" something decided during the run (not a config value: a resume reads
    its config without it)."""
    raw = json.loads(run.config.read_text())
    raw.setdefault("notes", {})[name] = note
    write_json(run.config, raw)


def fingerprint(cfg: Config, vocab_size: int) -> dict:
    """What a checkpoint's weights depend on: a resume must match it exactly."""
    return {"model": cfg.to_dict()["model"], "arch": dataclasses.asdict(cfg.objective.arch), "vocab_size": vocab_size}


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The backbone in the arrangement the objective asks for, with the recipe's sizes, initialised from
    `train.seed`; a model that cannot hold the objective's sequences is a UserError."""
    import torch

    from models.transformer import Transformer

    need = cfg.objective.positions_needed(cfg.data.seq_len)
    if need > cfg.model.max_len:
        raise UserError(f"the objective needs sequences of {need} tokens but model.max_len is {cfg.model.max_len}; "
                        f"raise model.max_len or lower data.seq_len")
    torch.manual_seed(cfg.train.seed)
    try:
        return Transformer(cfg.model, cfg.objective.arch, vocab_size)
    except ValueError as e:  # models/ validates with ValueError; for the user it is a config error
        raise UserError(str(e)) from None


def _at_step(root: Path, step: int) -> Path:
    """The complete checkpoint of `step` in `root`; a UserError listing the saved steps when it is absent."""
    from pretrain.checkpoint import PREFIX, list_checkpoints

    found = {int(p.name[len(PREFIX):]): p for p in list_checkpoints(root)}
    if step not in found:
        have = ", ".join(map(str, found)) or "none"
        raise UserError(f"{root.parent} has no checkpoint of step {step} (steps saved: {have}); give one of them")
    return found[step]


class Loaded(NamedTuple):
    """A trained run ready to use: its config, tokenizer, model (eval mode, on its device) and checkpoint."""

    cfg: Config
    tokenizer: Tokenizer
    model: torch.nn.Module
    checkpoint: Path


def load(run_dir: Path, device: str | torch.device | None = None, step: int | None = None) -> Loaded:
    """Load a run folder's config, tokenizer and newest checkpoint (or the one of `step`) onto `device` (default:
    the one `train.device` picks, `runtime.pick_device`); UserError when any is missing."""
    from pretrain import checkpoint
    from pretrain.runtime import pick_device
    from pretrain.tokenizer import Tokenizer

    run = RunDir(run_dir)
    cfg = load_config(run.path)
    path = checkpoint.latest(run.checkpoints) if step is None else _at_step(run.checkpoints, step)
    warn_strays(run)
    tokenizer = Tokenizer.load(run.tokenizer, cfg.objective.special_pieces)
    model = build_model(cfg, tokenizer.size)
    checkpoint.load_weights(path, model)
    dev = pick_device(cfg.train.device) if device is None else device
    return Loaded(cfg, tokenizer, model.to(dev).eval(), path)


def warn_strays(run: RunDir) -> None:
    """One warning per folder in checkpoints/ that is not a checkpoint (a copy such as step_best): ignored."""
    from pretrain import checkpoint
    from pretrain.errors import warn

    for p in checkpoint.strays(run.checkpoints):
        warn(f"{p} is not a checkpoint folder (step_N); it is ignored")


def check_resume(run: RunDir, cfg: Config, horizon: int) -> None:
    """UserError unless the run has a checkpoint to continue from and something left to do by `horizon`."""
    from pretrain import checkpoint

    if not checkpoint.list_checkpoints(run.checkpoints):
        raise UserError(f"{run.path} holds a run with no checkpoint (it never saved one), so there is nothing to "
                        f"resume; start it again with `pretrain run --out {run.path}` (it restarts from scratch)")
    warn_strays(run)
    path = checkpoint.latest(run.checkpoints)
    state = checkpoint.TrainState.from_json(checkpoint.read_state(path), path)
    tc = cfg.train
    if state.step >= horizon or (tc.max_tokens and state.tokens >= tc.max_tokens):
        raise UserError(f"the run in {run.path} already finished ({state.step} steps, {state.tokens:,} tokens, "
                        f"{path.name}); raise --max-steps or --max-tokens to train it further")


def check_same_data(run: RunDir, cache: Path, accept: bool, console: Any) -> None:
    """A resume must read the data the run started on: the token cache's key (tokenizer, corpus, options);
    with `accept` it goes on after a change, saying the run is no longer exact."""
    try:
        key = json.loads(run.data.read_text()).get("cache_key")
    except (OSError, ValueError, AttributeError):
        key = None  # no data.json (or an older run without the key): nothing to compare
    if key is None or key == Path(cache).name:
        return
    if not accept:
        raise UserError(f"the data of {run.path} changed since the run started (its token cache was {key}, now "
                        f"{Path(cache).name}); restore the corpus, or pass --accept-data-change to go on (the run "
                        "is then no longer an exact continuation)")
    console.print(f"note: the data of {run.path} changed since the run started; it goes on with the new data, "
                  "so it is no longer an exact continuation", markup=False)
