"""Data parallelism on PyTorch's own engine, under `torchrun`: DDP (every rank holds the whole model) or FSDP2
(`torch.distributed.fsdp.fully_shard`: parameters, gradients and optimizer state sharded over the ranks),
chosen by `train.parallel`.

FSDP2 is applied as torchtitan's `parallelize` functions do (`torchtitan/models/llama3/infra/parallelize.py`,
`apply_fsdp`): `fully_shard` on every Transformer block, then on the root (the embeddings, the heads and the
final norm), with a `MixedPrecisionPolicy` that follows `train.precision` (bf16 parameters for compute, fp32
gradient reduction and fp32 master weights in the optimizer). Gradient accumulation synchronises only on the
last micro-batch (`no_sync` for DDP, `set_requires_gradient_sync(False)` for FSDP), and clipping uses the
global norm over all shards. Checkpoints of sharded runs go through `torch.distributed.checkpoint`
(pretrain/checkpoint.py).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import TrainConfig
    from pretrain.runtime import Engine, Runtime


def mode_for(tcfg: TrainConfig, world: int, one_pass: bool = True) -> str:
    """"single", "ddp" or "fsdp" for `train.parallel` on `world` ranks; UserError for fsdp without torchrun, and for
    an objective whose loss makes several forward passes (`Objective.one_pass`), which ranks under FSDP must
    agree on."""
    if world == 1:
        if tcfg.parallel == "fsdp":
            raise UserError("train.parallel = 'fsdp' shards the model over the processes of torchrun, but this is "
                            "one process; launch it with `torchrun --nproc_per_node N -m pretrain.cli run ...`, or "
                            "use train.parallel=auto to train in one process")
        return "single"
    if tcfg.parallel == "fsdp" and not one_pass:
        raise UserError("train.parallel = 'fsdp' gathers the sharded weights at every forward pass, and this objective "
                        "makes one per mixture component in each micro-batch, a number the ranks do not share; use "
                        "train.parallel=ddp")
    if tcfg.parallel == "fsdp" and tcfg.precision == "fp16":
        raise UserError("train.parallel = 'fsdp' trains in bf16 or fp32 (its mixed precision has no loss scaling); "
                        "use train.precision=bf16")
    return "fsdp" if tcfg.parallel == "fsdp" else "ddp"


def shard(model: torch.nn.Module, tcfg: TrainConfig) -> None:
    """FSDP2 in place: every block, then the root; bf16 compute with fp32 reduction under train.precision=bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if tcfg.precision == "bf16" else MixedPrecisionPolicy()
    for stack in model.stacks():
        for block in stack.blocks:
            fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def wrap(engine: Engine, compile_model: bool) -> None:
    """The module the forward pass goes through: DDP's wrapper, or the (already sharded) model; compiled on
    request."""
    if engine.mode == "ddp":
        # No buffer broadcast: the model's one buffer (the sinusoid table) is a constant, and a broadcast at every
        # forward pass is a collective that ranks making different numbers of passes (a mixture) could not match.
        engine.fwd = torch.nn.parallel.DistributedDataParallel(engine.model, broadcast_buffers=False)
    if compile_model:
        engine.fwd = torch.compile(engine.fwd)


def grad_sync(engine: Engine, last: bool) -> contextlib.AbstractContextManager:
    """Around one micro-batch's backward: gradients are reduced over the ranks only after the last one."""
    if engine.mode == "ddp" and not last:
        return engine.fwd.no_sync()
    if engine.mode == "fsdp":
        engine.model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip(engine: Engine, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm of max_norm (inf: measure only); returns the norm before clipping,
    over every shard."""
    norm = torch.nn.utils.clip_grad_norm_(engine.model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor of the global norm


def all_keys(keys: list[str], rt: Runtime) -> list[str]:
    """Every rank's metric names, the same list on all of them (itself on one process): a term a rank did not
    report (a mixture's component absent from its batches) is then summed as zero there, and every rank reduces
    tensors of one length."""
    if rt.world == 1:
        return keys
    names: list = [None] * rt.world
    dist.all_gather_object(names, sorted(keys))
    return sorted(set().union(*names))


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """The sums over all ranks of a list of numbers (itself on one process)."""
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()
