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

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.tensor import DTensor

from pretrain.errors import UserError, os_error

if TYPE_CHECKING:
    from pretrain.runtime import Engine

PREFIX = "step_"


class NonFinite(UserError):
    """Training produced NaN or infinite weights: nothing was saved."""


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


STEP_DIR = re.compile(rf"{PREFIX}(\d+)")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in the folder `root`, oldest first: `step_N` folders holding a state.json (a folder
    without it is an unfinished write; any other name, a copy such as `step_best`, is not ours: `strays`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def strays(root: Path) -> list[Path]:
    """Entries of `root` that are neither checkpoints nor our temporary folders: ignored, worth a warning."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not STEP_DIR.fullmatch(p.name) and not p.name.startswith(".tmp-"))


def remove_stale_tmp(root: Path) -> None:
    """Delete temporary checkpoint folders (`.tmp-step_N-PID`) left by writes that were killed: their process
    is gone. A checkpoint's size each, so they must not pile up."""
    root = Path(root)
    for p in root.glob(".tmp-*") if root.is_dir() else ():
        try:
            os.kill(int(p.name.rsplit("-", 1)[-1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):  # not our name, or a live process of another user
            pass


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
    """Write checkpoint `step` into the folder `root` atomically and prune older ones. Returns its folder.
    A failed write (a full disk, say) leaves nothing behind but the checkpoints that were already trusted, and
    is a UserError naming the newest of them."""
    root = Path(root)
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    with writing(root, step, tmp) as final:
        save_model(model, str(tmp / "model.safetensors"))
        commit(tmp, final, tensors, state)
    prune(root, keep_last)
    return final


@contextlib.contextmanager
def writing(root: Path, step: int, tmp: Path, create: bool = True):
    """Around the write of checkpoint `step` through the temporary folder `tmp` (made here unless `create` is
    False): yields the final folder; on a file-system error removes `tmp` and raises the UserError that names
    the newest trusted checkpoint."""
    final = Path(root) / f"{PREFIX}{step:07d}"
    try:
        if create:
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        yield final
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        found = list_checkpoints(root)
        trusted = (f"the newest trusted checkpoint is {found[-1]} (--resume continues from it)" if found else
                   "no checkpoint was saved before")
        why = os_error(e).args[0] if isinstance(e, OSError) else str(e).splitlines()[0]
        raise UserError(f"writing checkpoint {final} failed ({why}); {trusted}") from None


def commit(tmp: Path, final: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Finish a checkpoint written into `tmp`: the other tensors, then state.json (fsynced, last), then the
    rename that makes it trusted."""
    save_file(tensors, str(tmp / "train.safetensors"))
    with open(tmp / "state.json.tmp", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / "state.json.tmp", tmp / "state.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def prune(root: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` checkpoints."""
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupted (state.json unreadable: {e}); delete it to fall back "
                        "to an older one") from None


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded `model` strictly (model.safetensors, or an FSDP run's
    shards); corrupted, mismatched or non-finite weights are UserErrors."""
    from pretrain import sharded

    path = ckpt / "model.safetensors"
    if sharded.is_sharded(ckpt):
        sharded.load_model_shards(ckpt, model)
        missing = unexpected = ()
    else:
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
    bad = non_finite(model)
    if bad:
        raise UserError(f"checkpoint {ckpt} holds non-finite weights ({', '.join(bad[:3])}); delete that checkpoint "
                        "folder to fall back to an older one")


def non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (in this rank's shard, for a sharded model)."""
    def local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if isinstance(p, DTensor) else p

    return [n for n, p in model.named_parameters() if not bool(torch.isfinite(local(p)).all())]


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "train.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is corrupted or unreadable ({str(e).splitlines()[0]}); "
                        "delete that checkpoint folder to fall back to an older one") from None


def restore_training(root: Path, engine: Engine, fingerprint: dict) -> TrainState:
    """Load the newest checkpoint in `root` into the engine's model, optimizer and grad scaler and this rank's
    RNG; returns its TrainState. A checkpoint of another architecture, or of another world size when the run's
    global batch depends on it, is a UserError."""
    from pretrain import sharded

    path = latest(root)
    saved = read_state(path)
    state = TrainState.from_json(saved, path)
    if saved.get("fingerprint") != fingerprint:
        raise UserError(f"checkpoint {path} was saved by a model of another architecture than the run's "
                        "config.json describes; resume it with its own run folder")
    _check_layout(path, saved, engine)
    tensors = load_tensors(path)
    if sharded.is_sharded(path):
        sharded.load_shards(path, engine)
    else:
        if engine.mode == "fsdp":
            raise UserError(f"checkpoint {path} holds the whole model, not FSDP shards; resume it with the run's own "
                            "settings (train.parallel = ddp)")
        load_weights(path, engine.model)
        try:
            load_optimizer_state(engine.opt, saved["optimizer"], tensors)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {path} has an optimizer state that does not fit this run ({e}); "
                            "resume it with its own run folder") from None
    _set_rng(path, tensors, engine.rt.rank)
    if saved.get("scaler"):
        engine.scaler.load_state_dict(saved["scaler"])
    return state


def _check_layout(path: Path, saved: dict, engine: Engine) -> None:
    """A run's batches depend on its world size unless it set train.global_batch (then any world resumes it)."""
    world = int((saved.get("layout") or {}).get("world", 1))
    if world != engine.rt.world and not saved.get("global_batch"):
        raise UserError(f"checkpoint {path} was written by {world} rank(s) and its global batch depends on that; "
                        f"resume it on {world} (torchrun --nproc_per_node {world}), or start runs with "
                        "train.global_batch set so that they may move between world sizes")


def _set_rng(path: Path, tensors: dict[str, torch.Tensor], rank: int) -> None:
    """This rank's global RNG state from a checkpoint (rank 0's where the rank has none saved)."""
    suffix = f".rank{rank}" if f"rng.cpu.rank{rank}" in tensors else ""
    if f"rng.cpu{suffix}" not in tensors:
        raise UserError(f"checkpoint {path} is corrupted (train.safetensors lacks the RNG state rng.cpu); delete "
                        "that checkpoint folder to fall back to an older one")
    torch.set_rng_state(tensors[f"rng.cpu{suffix}"])
    if torch.cuda.is_available() and f"rng.cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG states (they drive dropout), as checkpoint tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_training(root: Path, engine: Engine, state: TrainState, identity: dict, keep_last: int,
                  rng: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Checkpoint a training run at `state.step` into `root`: weights, optimizer, grad scaler and every rank's
    RNG states (`rng`, default the current ones; the trainer passes those of the step's start on an
    interrupt), with `identity` ({"fingerprint": what the weights depend on, "global_batch": the run's
    train.global_batch}). Under torchrun every rank calls it: rank 0 writes, and under FSDP every rank writes
    its shards. Returns the folder on rank 0. Non-finite weights are never saved (NonFinite, on every rank)."""
    from pretrain import sharded
    from pretrain.parallel import all_sum

    rt = engine.rt
    bad = non_finite(engine.model)
    if all_sum([float(len(bad))], rt)[0]:  # every rank stops, whichever shard went bad
        raise NonFinite(f"the weights are non-finite after step {state.step} ({', '.join(bad[:3]) or 'on a rank'})")
    tensors = sharded.gather_rng(rng or rng_state(), rt)
    meta = {**dataclasses.asdict(state), **identity, "layout": {"mode": engine.mode, "world": rt.world},
            "scaler": engine.scaler.state_dict() if engine.scaler.is_enabled() else None}
    if engine.mode == "fsdp":
        return sharded.save_sharded(root, state.step, engine, tensors, meta, keep_last)
    if not rt.main:
        return None
    meta["optimizer"] = optimizer_state(engine.opt, tensors)
    return save(root, state.step, engine.model, tensors, meta, keep_last)
