"""Atomic checkpoints without pickle: safetensors for every tensor, JSON for everything else, and the
`TrainState` they carry.

A run's checkpoints live in one folder (`RunDir.checkpoints`, i.e. `RUN/checkpoints/`), one `step_NNNNNNN/`
each, holding
    model.safetensors   the weights (shared/tied tensors handled by safetensors' save_model)
    train.safetensors   optimizer tensors, RNG states, grad-scaler scale
    state.json          the TrainState (step, tokens seen, early-stopping state, elapsed time, a time
                        budget's frozen horizon), the
                        optimizer's structure and scalars, the grad scaler's state, and the architecture
                        fingerprint that a resume must match
It is written into a temporary folder and renamed into place, `state.json` last, so a crash never leaves
a checkpoint that `latest()` would trust. Only the newest `keep_last` are kept. torchtitan's
`torchtitan/components/checkpoint.py` works the same way: one owner of what is saved, the train state
saved like any other state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.runtime import Engine

PREFIX = "step_"


@dataclass
class TrainState:
    """The progress of a training run: what a checkpoint saves beside the weights and optimizer, and what a
    resume continues from."""

    step: int = 0  # optimizer steps taken
    tokens: int = 0  # input tokens seen, all ranks
    best_val: float = math.inf  # best validation loss so far (early stopping)
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    elapsed: float = 0.0  # seconds of training so far, over every session of the run
    horizon: int = 0  # the schedule's horizon estimated for the time budget, frozen (0 = none; budget.Horizon)
    horizon_budget: float = 0.0  # the train.max_time in seconds that horizon was planned for

    @classmethod
    def from_json(cls, saved: Any, where: Path) -> TrainState:
        """The state saved in a checkpoint's state.json; UserError naming the file when it is malformed."""
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(saved, dict):  # checkpoints written before the time budget existed have no horizon
            saved = {"horizon": 0, "horizon_budget": 0.0, **saved}
        if not isinstance(saved, dict) or any(not isinstance(saved.get(k), (int, float)) for k in names):
            raise UserError(f"checkpoint {where} is corrupted (state.json lacks a numeric {', '.join(names)}); "
                            "delete that checkpoint folder to fall back to an older one")
        return cls(**{k: type(getattr(cls(), k))(saved[k]) for k in names})


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in the folder `root`, oldest first (a folder without state.json is ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: Path) -> Path:
    """The newest complete checkpoint in `root`; a UserError when there is none."""
    found = list_checkpoints(root)
    if not found:
        raise UserError(f"{Path(root).parent} has no checkpoint (no {root}/{PREFIX}*/state.json); "
                        "give the folder of a run that saved one")
    return found[-1]


def _flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside `obj` (dicts/lists of scalars) by a {"__tensor__": key} reference."""
    if isinstance(obj, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _flatten_state(v, f"{prefix}{k}.", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten_state(v, f"{prefix}{i}.", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten_state(v, tensors) for v in obj]
    return obj


def optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """The optimizer's state_dict with tensors moved into `tensors` (JSON-able structure returned)."""
    return _flatten_state(optimizer.state_dict(), "optim.", tensors)


def load_optimizer_state(optimizer: torch.optim.Optimizer, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    sd = _unflatten_state(structure, tensors)
    sd["state"] = {int(k): v for k, v in sd["state"].items()}  # JSON turned the integer keys into strings
    optimizer.load_state_dict(sd)


def save(root: Path, step: int, model: torch.nn.Module, tensors: dict[str, torch.Tensor], state: dict,
         keep_last: int) -> Path:
    """Write checkpoint `step` into the folder `root` atomically and prune older ones. Returns its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    save_file(tensors, str(tmp / "train.safetensors"))
    with open(tmp / "state.json.tmp", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / "state.json.tmp", tmp / "state.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupted (state.json unreadable: {e}); delete it to fall back "
                        "to an older one") from None


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model` strictly; corrupted or mismatched files are UserErrors."""
    path = ckpt / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is corrupted or unreadable ({str(e).splitlines()[0]}); "
                        "delete that checkpoint folder to fall back to an older one") from None
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"checkpoint {path} was saved by a model of another architecture "
                        f"({str(e).splitlines()[-1].strip()}); use the run's own config") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {path} was saved by a model of another architecture (missing "
                        f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); use the run's own config")


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "train.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is corrupted or unreadable ({str(e).splitlines()[0]}); "
                        "delete that checkpoint folder to fall back to an older one") from None


def restore_training(root: Path, engine: Engine, fingerprint: dict) -> TrainState:
    """Load the newest checkpoint in `root` into the engine's model, optimizer and grad scaler and the global
    RNG; returns its TrainState. A checkpoint whose architecture fingerprint differs is a UserError."""
    path = latest(root)
    saved = read_state(path)
    state = TrainState.from_json(saved, path)
    if saved.get("fingerprint") != fingerprint:
        raise UserError(f"checkpoint {path} was saved by a model of another architecture than the run's "
                        "config.json describes; resume it with its own run folder")
    load_weights(path, engine.model)
    tensors = load_tensors(path)
    try:
        load_optimizer_state(engine.opt, saved["optimizer"], tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} has an optimizer state that does not fit this run ({e}); "
                        "resume it with its own run folder") from None
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if saved.get("scaler"):
        engine.scaler.load_state_dict(saved["scaler"])
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG states (they drive dropout), as checkpoint tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_training(root: Path, engine: Engine, state: TrainState, fingerprint: dict, keep_last: int,
                  rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Checkpoint a training run at `state.step` into `root`: weights, optimizer, grad scaler and the RNG states
    (`rng`, default the current ones; the trainer passes those of the step's start on an interrupt)."""
    tensors = dict(rng or rng_state())
    full = {**dataclasses.asdict(state), "fingerprint": fingerprint,
            "optimizer": optimizer_state(engine.opt, tensors),
            "scaler": engine.scaler.state_dict() if engine.scaler.is_enabled() else None}
    return save(root, state.step, engine.model, tensors, full, keep_last)
