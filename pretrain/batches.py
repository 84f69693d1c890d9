"""Which micro-batches make up each optimizer step: the global batch, its split over the ranks, GPT-3's batch
ramp (Brown et al. 2020, "Language Models are Few-Shot Learners", appendix B: "we also gradually increase the
batch size linearly from a small value ... over the first 4-12 billion tokens"), and the DataLoader dataset
that builds them.

Step s has G(s) micro-batches of `train.batch_size` rows over all ranks, numbered g = 0 .. G(s) - 1; rank r
builds g = r, r + world, r + 2 world, ... Micro-batch g of step s is a pure function of (seed, s, g)
(`make_generator(seed, "train", s, g, 0)`; the trailing 0 keeps the keys of one-process runs as they always
were), so a step's global batch does not depend on how many ranks share it: one process with G micro-batches
and G ranks with one each compute the same update, and a run may resume on another number of ranks.

The ramp grows the global batch from `batch_warmup_start` sequences to the full batch linearly in the
tokens trained so far, in whole rounds of one micro-batch per rank. It counts nominal tokens (rows x
seq_len), so the plan of every step is known before the step runs: batches stay pure and the DataLoader can
build them ahead. The learning-rate schedule then runs on the same clock, in full-batch steps of tokens
(`lr_clock`), so a small early step moves it by less; without a ramp the clock is the step count.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from objectives.base import Batch, make_generator
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.runtime import Runtime
    from pretrain.trainer import Data


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batches per step, over all ranks and on each rank, and the tokens trained before a step."""

    rows: int  # sequences per micro-batch (train.batch_size)
    world: int  # ranks
    full: int  # micro-batches per step over all ranks at the full batch
    seq_len: int  # tokens per sequence (data.seq_len)
    ramp_start: int = 0  # sequences per step where the ramp starts (0 = no ramp)
    ramp_tokens: int = 0  # nominal tokens the ramp takes to reach the full batch

    @classmethod
    def of(cls, cfg: Config, world: int) -> BatchPlan:
        """The plan of `cfg` on `world` ranks; UserError when the global batch does not split evenly."""
        tc = cfg.train
        full = tc.grad_accum * world
        if tc.global_batch:
            if tc.global_batch % (tc.batch_size * world):
                raise UserError(f"train.global_batch {tc.global_batch} is not a whole number of micro-batches of "
                                f"train.batch_size {tc.batch_size} on each of {world} ranks; make it a multiple of "
                                f"{tc.batch_size * world}")
            full = tc.global_batch // tc.batch_size
        ramp = tc.batch_warmup_tokens > 0 and tc.batch_warmup_start < full * tc.batch_size
        return cls(tc.batch_size, world, full, cfg.data.seq_len, tc.batch_warmup_start if ramp else 0,
                   tc.batch_warmup_tokens if ramp else 0)

    @cached_property
    def _ramp(self) -> np.ndarray:
        """(R,) int64 global micro-batches of the steps 0 .. R-1 that are smaller than the full batch."""
        if not self.ramp_tokens:
            return np.zeros(0, np.int64)
        out, tokens, per_round = [], 0, self.rows * self.world
        while True:
            seqs = self.ramp_start + (self.full * self.rows - self.ramp_start) * min(1.0, tokens / self.ramp_tokens)
            g = min(self.full, max(1, math.ceil(seqs / per_round)) * self.world)
            if g >= self.full:
                return np.asarray(out, np.int64)
            out.append(g)
            tokens += g * self.rows * self.seq_len

    @cached_property
    def _ramp_before(self) -> np.ndarray:
        """(R+1,) global micro-batches of the steps before each ramp step (and after the last)."""
        return np.concatenate([[0], np.cumsum(self._ramp)]).astype(np.int64)

    def micro(self, step: int) -> int:
        """Micro-batches of step `step` over all ranks."""
        return int(self._ramp[step]) if step < len(self._ramp) else self.full

    def local(self, step: int) -> int:
        """Micro-batches of step `step` on each rank."""
        return self.micro(step) // self.world

    def micro_before(self, step: int) -> int:
        """Micro-batches over all ranks of the steps before `step`."""
        R = len(self._ramp)
        return int(self._ramp_before[min(step, R)]) + max(0, step - R) * self.full

    def tokens_before(self, step: int) -> int:
        """Nominal tokens (rows x seq_len) of the steps before `step`."""
        return self.micro_before(step) * self.rows * self.seq_len

    def lr_clock(self, step: int) -> float:
        """Where the learning-rate schedule is at `step`, in full-batch steps of tokens (the step itself
        without a ramp)."""
        if not len(self._ramp):
            return float(step)
        return self.micro_before(step) / self.full

    def steps_for_tokens(self, tokens: int) -> int:
        """The fewest steps whose nominal tokens reach `tokens`."""
        per_step = self.full * self.rows * self.seq_len
        R = len(self._ramp)
        if self.tokens_before(R) >= tokens:
            return int(np.searchsorted(self._ramp_before * self.rows * self.seq_len, tokens, side="left"))
        return R + math.ceil((tokens - self.tokens_before(R)) / per_step)

    def step_of(self, k: int) -> tuple[int, int]:
        """(step, j) of a rank's k-th micro-batch since step 0: it is that step's j-th on the rank."""
        local_before = self._ramp_before // self.world
        R = len(self._ramp)
        if k < local_before[-1]:
            s = int(np.searchsorted(local_before, k, side="right")) - 1
            return s, k - int(local_before[s])
        s, j = divmod(k - int(local_before[-1]), self.full // self.world)
        return R + s, j


class StepBatches(torch.utils.data.Dataset):
    """The micro-batches one rank builds for steps start .. horizon-1, in order: item i is the rank's i-th."""

    def __init__(self, cfg: Config, data: Data, plan: BatchPlan, rank: int, start: int, horizon: int) -> None:
        self.cfg, self.data, self.plan, self.rank = cfg, data, plan, rank
        self.first = plan.micro_before(start) // plan.world
        self.n = max(0, plan.micro_before(horizon) // plan.world - self.first)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        tc, plan = self.cfg.train, self.plan
        step, j = plan.step_of(self.first + i)
        gen = make_generator(tc.seed, "train", step, j * plan.world + self.rank, 0)
        return self.cfg.objective.batch(self.data.train, self.data.vocab, gen, tc.batch_size, self.cfg.data.seq_len)


def worker_init(_: int) -> None:
    """DataLoader workers build batches with one thread each, so they never fight the main process, and leave
    Ctrl-C to it (the main process stops at a consistent point and shuts them down)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader(cfg: Config, data: Data, plan: BatchPlan, rt: Runtime, start: int, horizon: int):
    """An iterator over this rank's micro-batches of steps start .. horizon-1, built in DataLoader workers."""
    tc = cfg.train
    dl = torch.utils.data.DataLoader(
        StepBatches(cfg, data, plan, rt.rank, start, horizon), batch_size=None,
        num_workers=tc.num_workers, worker_init_fn=worker_init, pin_memory=rt.device.type == "cuda",
        prefetch_factor=4 if tc.num_workers else None, generator=torch.Generator().manual_seed(0))
    return iter(dl)
