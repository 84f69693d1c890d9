"""Where and how we compute: the device (chosen in one place, `pick_device`), autocast precision, the
torchrun process group, and the `Engine` a training step acts on.

Device: CUDA if present, else MPS, else CPU, unless `train.device` names one. Distributed: `torchrun` sets
RANK / WORLD_SIZE / LOCAL_RANK; we join its process group (NCCL on CUDA, gloo otherwise) and never launch
processes ourselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pretrain.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from pretrain.config import TrainConfig

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(want: str = "auto", local_rank: int = 0) -> torch.device:
    """The device for `train.device` = want: auto = CUDA if present, else MPS, else CPU; under torchrun each
    process takes CUDA device LOCAL_RANK. A named device that is absent is a UserError."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use --set train.device=auto or cpu")
    if want == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device = 'mps' but MPS is not available; use --set train.device=auto or cpu")
    return torch.device(f"cuda:{local_rank}" if want == "cuda" else want)


@dataclass
class Runtime:
    """Where and how we compute: device, autocast dtype, distributed rank and world size."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the rank within this machine (torchrun's LOCAL_RANK)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the device, or nothing for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


KEEP_FREED_BYTES = 1 << 30  # blocks up to this size come from the heap, and freed memory stays mapped


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve blocks up to KEEP_FREED_BYTES from its heap and never hand freed memory back
    to the system (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). By default every large tensor of a training
    step (logit chunks, activations, their gradients) is a fresh mmap whose pages fault in again on first
    touch, step after step: about 15% of a tiny CPU step here. This is the page-fault cost PyTorch's CPU
    performance tuning guide (pytorch.org, recipes/recipes/tuning_guide: "Switch Memory allocator") answers
    with jemalloc or tcmalloc; the two glibc settings do the same without preloading a library. The process
    keeps its peak footprint instead of shrinking between steps. Returns whether the settings took (False off
    glibc, where nothing is changed)."""
    import ctypes

    try:  # the symbols already loaded into this process, libc's among them (no library search at start-up)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def setup_runtime(tcfg: TrainConfig) -> Runtime:
    """Pick the device and join torchrun's process group when there is one; keep freed memory mapped
    (`keep_freed_memory`)."""
    keep_freed_memory()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(tcfg.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, amp_dtype=AMP_DTYPES[tcfg.precision], rank=rank, world=world, local_rank=local)


@dataclass
class Engine:
    """What a training step acts on: the runtime, the model, the module the forward pass goes through (the
    model itself, or its DDP / torch.compile wrapper), the optimizer, the grad scaler (enabled for fp16) and
    how the ranks share the model (pretrain/parallel.py)."""

    rt: Runtime
    model: torch.nn.Module
    fwd: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mode: str = "single"  # single (one process), ddp (replicated) or fsdp (sharded)


def warn_if_busy(console: Console) -> None:
    """Warn once when the load average says other work already holds the cores (timings will suffer)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > 0.75 * cores:
        console.print(f"[yellow]warning:[/] load average {load:.1f} on {cores} cores: other work holds the CPU, "
                      "so this run will be slower than usual")


class Interrupts:
    """Ctrl-C during training, deferred to the points where the run is consistent.

    The first SIGINT only sets `pending`; the loop calls `check()` between micro-batches (before the optimizer
    step: the checkpoint then holds the steps before, with the RNG as this step began) and once a step is
    counted (the checkpoint holds that step). Between the optimizer update and the step count a Ctrl-C waits,
    so a checkpoint never pairs step N with step N+1's weights. A second Ctrl-C stops at once (`forced`), and
    then nothing is saved. Only the main thread of a single process installs the handler (torchrun sends the
    signal to every rank, which could not agree on the point to stop).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.pending, self.forced, self._old = enabled, False, False, None

    def __enter__(self) -> Interrupts:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: object) -> None:
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise KeyboardInterrupt here if Ctrl-C was pressed since the last check."""
        if self.pending:
            raise KeyboardInterrupt
