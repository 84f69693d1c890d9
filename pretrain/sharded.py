"""Checkpoints of FSDP runs through `torch.distributed.checkpoint` (DCP): every rank writes its own shard of
the weights and the optimizer state, and a checkpoint saved by N ranks loads into M ranks, or into one
process (eval, generate, export), resharded on the way in (as torchtitan's
`torchtitan/components/checkpoint.py` does).

The shards are safetensors files (DCP's `HuggingFaceStorageWriter` with `save_distributed=True`: each file
carries its slice's offsets in its header), so a checkpoint holds no pickle, not even DCP's usual
`.metadata`: `HuggingFaceStorageReader` rebuilds the layout from the headers. Keys: `model.<name>` for the
weights and `optim.<name>.<state>` for the optimizer's tensors (AdamW's moments and step); the optimizer's
hyper-parameters are not saved, they come from the run's config. Everything else (the TrainState, every
rank's RNG) is written by rank 0 beside the shards, as for unsharded checkpoints (pretrain/checkpoint.py).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.runtime import Engine

SHARDS = "shards"  # the folder of safetensors shards inside a checkpoint folder


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (an FSDP run's) rather than one model.safetensors."""
    return (Path(ckpt) / SHARDS).is_dir()


def _state_dicts(engine: Engine) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(model state dict, optimizer state dict, the flat name -> tensor view of both that DCP reads and
    writes in place). On a fresh optimizer, DCP's `get_optimizer_state_dict` allocates its state first."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(engine.model)
    osd = get_optimizer_state_dict(engine.model, engine.opt)
    flat = {f"model.{k}": v for k, v in msd.items()}
    for name, state in osd["state"].items():
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise UserError(f"the optimizer keeps a non-tensor state {k!r}, which a sharded checkpoint cannot "
                                "hold; use train.optimizer=adamw with train.parallel=fsdp")
            flat[f"optim.{name}.{k}"] = v
    return msd, osd, flat


def save_shards(folder: Path, engine: Engine) -> None:
    """Every rank writes its shards of the weights and optimizer state into `folder`/shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    _, _, flat = _state_dicts(engine)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(Path(folder) / SHARDS), save_distributed=True))


def load_shards(ckpt: Path, engine: Engine) -> None:
    """Load the weights and optimizer state of a sharded checkpoint into the engine, resharded to however
    its model is laid out now (collective under torchrun)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    msd, osd, flat = _state_dicts(engine)
    _read(ckpt, flat)
    set_model_state_dict(engine.model, msd)
    set_optimizer_state_dict(engine.model, engine.opt, osd)


def load_model_shards(ckpt: Path, model: torch.nn.Module) -> None:
    """Load the weights of a sharded checkpoint into an unsharded model in one process (eval, generate)."""
    sd = model.state_dict()  # tensors that share storage with the parameters: DCP fills them in place
    _read(ckpt, {f"model.{k}": v for k, v in sd.items()})


def _read(ckpt: Path, flat: dict[str, torch.Tensor]) -> None:
    """Fill `flat`'s tensors from the checkpoint's shards; a missing key or shard is a UserError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(Path(ckpt) / SHARDS)),
                     process_group=None if not dist.is_initialized() else dist.group.WORLD)
    except (CheckpointException, RuntimeError, OSError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {ckpt} does not fit this model or is incomplete ({first[:200]}); resume it "
                        "with its own run folder, or delete it to fall back to an older one") from None


def gather_rng(rng: dict[str, torch.Tensor], rt) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, on rank 0 ({} elsewhere): rank 0's under their own names (`rng.cpu`), rank r's
    as `rng.cpu.rank{r}` (collective under torchrun). Ranks draw dropout masks for batches of their own, so
    an exact resume needs each rank's state back."""
    if rt.world == 1:
        return dict(rng)
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(rng.items()):
        buf = t.to(rt.device)
        parts = [torch.empty_like(buf) for _ in range(rt.world)]
        dist.all_gather(parts, buf)
        for r, part in enumerate(parts):
            out[name if r == 0 else f"{name}.rank{r}"] = part.cpu()
    return out if rt.main else {}


def save_sharded(root: Path, step: int, engine: Engine, tensors: dict[str, torch.Tensor], meta: dict,
                 keep_last: int) -> Path | None:
    """Checkpoint `step` of an FSDP run (collective): every rank writes its shards into a temporary folder
    named by rank 0, then rank 0 adds `tensors` (the RNG states) and state.json and renames the folder into
    place; a killed or failed write leaves no folder that `latest()` trusts. Returns the folder on rank 0."""
    from pretrain import checkpoint as ckpt
    from pretrain.parallel import all_sum

    rt = engine.rt
    pid = int(all_sum([float(os.getpid() if rt.main else 0)], rt)[0])  # rank 0's pid names the folder for all
    tmp = Path(root) / f".tmp-{ckpt.PREFIX}{step:07d}-{pid}"
    with ckpt.writing(root, step, tmp, create=rt.main) as final:
        if all_sum([0.0 if tmp.is_dir() or not rt.main else 1.0], rt)[0]:
            raise OSError(f"could not create {tmp}")
        dist.barrier()  # the folder exists before any rank writes into it
        save_shards(tmp, engine)
        if rt.main:
            ckpt.commit(tmp, final, tensors, meta)
    dist.barrier()  # the checkpoint is trusted (or failed) before any rank goes on
    if rt.main:
        ckpt.prune(root, keep_last)
    return final if rt.main else None
