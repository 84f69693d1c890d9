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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def create(run: RunDir, cfg: Config, sources: list, tokenizer: Path, data_meta: dict) -> None:
    """Start a run folder: the resolved config with its sources, the tokenizer and the data's metadata."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(json.dumps({**cfg.to_dict(), "sources": sources}, indent=2))
    shutil.copyfile(tokenizer, run.tokenizer)
    run.data.write_text(json.dumps(data_meta, indent=2, default=str))


def load_config(run_dir: Path) -> Config:
    """The config a run was trained with (RUN/config.json); a UserError when the folder is not a run."""
    from pretrain.config import config_from_dict

    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json); give the folder `pretrain run` wrote")
    raw = json.loads(path.read_text())
    raw.pop("sources", None)
    raw.pop("notes", None)
    return config_from_dict(raw)


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


class Loaded(NamedTuple):
    """A trained run ready to use: its config, tokenizer, model (eval mode, on its device) and checkpoint."""

    cfg: Config
    tokenizer: Tokenizer
    model: torch.nn.Module
    checkpoint: Path


def load(run_dir: Path, device: str | torch.device | None = None) -> Loaded:
    """Load a run folder's config, tokenizer and newest checkpoint onto `device` (default: the one
    `train.device` picks, `runtime.pick_device`); UserError when any is missing."""
    from pretrain import checkpoint
    from pretrain.runtime import pick_device
    from pretrain.tokenizer import Tokenizer

    run = RunDir(run_dir)
    cfg = load_config(run.path)
    path = checkpoint.latest(run.checkpoints)
    tokenizer = Tokenizer.load(run.tokenizer, cfg.objective.special_pieces)
    model = build_model(cfg, tokenizer.size)
    checkpoint.load_weights(path, model)
    dev = pick_device(cfg.train.device) if device is None else device
    return Loaded(cfg, tokenizer, model.to(dev).eval(), path)
