"""The one training loop every objective shares.

Order of one step: set LR -> maybe eval -> for each micro-batch: forward, objective loss, backward ->
all-reduce counts -> clip -> optimizer step -> log -> maybe checkpoint.

Loss averaging happens here and only here: each loss term's targets are counted from the batch (entries of
the field named in `objective.loss_terms` that are not IGNORE_INDEX), summed over the step's micro-batches
and all ranks, and every micro-batch's summed loss is divided by that global count before backward. So
1x8 and 4x2 accumulation give the same update, and so do 1 and N GPUs.

Every batch is a pure function of (seed, step, global micro-batch index) (pretrain/batches.py: the global
batch, its split over ranks, the batch ramp), and a checkpoint stores the weights, optimizer, every rank's
dropout RNG and the `TrainState`: a resumed run repeats an uninterrupted one bit for bit on CPU. Under
torchrun the model is replicated (DDP) or sharded (FSDP2) over the ranks (pretrain/parallel.py).

Budgets: max_steps, max_tokens and max_time (a wall-clock budget whose schedule horizon is estimated from the
measured step time, pretrain/budget.py); the first one spent ends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from rich.console import Console

from objectives.base import IGNORE_INDEX, Batch, Objective, input_tokens
from pretrain import checkpoint as ckpt
from pretrain import parallel
from pretrain import run as runs
from pretrain.batches import BatchPlan, loader
from pretrain.budget import Horizon
from pretrain.checkpoint import TrainState
from pretrain.errors import UserError
from pretrain.evaluate import evaluate
from pretrain.metrics import Meter, TrainLog
from pretrain.optim import build_optimizer, set_lr
from pretrain.runlist import running
from pretrain.runtime import Engine, Interrupts, Runtime, setup_runtime, warn_if_busy

if TYPE_CHECKING:
    from pretrain.config import Config, TrainConfig
    from pretrain.data import Prepared, TokenSplit
    from pretrain.tokenizer import Vocab


@dataclass(frozen=True)
class Data:
    """The run's vocabulary and its two splits of the token cache."""

    vocab: Vocab
    train: TokenSplit
    valid: TokenSplit


def target_counts(objective: Objective, batches: list[Batch], rt: Runtime) -> tuple[dict[str, torch.Tensor], int]:
    """Per loss term, the targets over all micro-batches and ranks (the one divisor of each term), and the
    input tokens of the step over all ranks: one all-reduce."""
    per_batch = [[float((b[f] != IGNORE_INDEX).sum()) for f in objective.loss_terms.values()] + [input_tokens(b)]
                 for b in batches]
    counts = torch.tensor(per_batch, dtype=torch.float64).sum(0).to(rt.device)
    if rt.world > 1:
        dist.all_reduce(counts)
    terms = dict(zip(objective.loss_terms, counts[:-1].float().clamp(min=1), strict=True))
    return terms, int(counts[-1])


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Start:
    """How a call of `train` starts: a new run or a resume, and what comes with it."""

    resume: bool = False  # continue the run in run_dir from its newest checkpoint
    sources: list = dataclasses.field(default_factory=list)  # where each non-default config value came from
    accept_data_change: bool = False  # a resume goes on although the corpus changed (no longer exact)
    init_from: str | None = None  # a Hugging Face model (folder or hub name) whose weights start a new run


def train(cfg: Config, run_dir: Path, start: Start | None = None, console: Console | None = None) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there, `start.resume`); returns the summary it prints.
    Every check of the run folder happens before any work."""
    start = start or Start()
    resume = start.resume
    console = console or Console()
    rt = setup_runtime(cfg.train)
    run, plan = runs.RunDir(run_dir), BatchPlan.of(cfg, rt.world)
    mode = parallel.mode_for(cfg.train, rt.world, cfg.objective.one_pass)
    if resume:
        runs.check_resume(run, cfg, _horizon(cfg, plan))
    elif note := runs.check_new(run):  # every rank checks, so that all of them stop together
        if rt.world > 1:
            dist.barrier()  # every rank has looked before rank 0 clears the old run
        if rt.main:
            runs.clear(run)
            console.print(f"note: {note}", markup=False)
    if rt.main:
        warn_if_busy(console)
        ckpt.remove_stale_tmp(run.checkpoints)
    prepared = _prepare(cfg, run, rt, console, resume)
    if resume:
        runs.check_same_data(run, prepared.cache.path, start.accept_data_change, console)
    data = Data(prepared.tokenizer.vocab, prepared.cache.split("train"), prepared.cache.split("valid"))
    engine, state = _start(cfg, run, dataclasses.replace(rt), mode, prepared, start)
    if resume and rt.main:
        runs.keep_metrics_until(run, state.step)  # the steps after the checkpoint are logged again
    with running(run) if rt.main else contextlib.nullcontext():  # `pretrain runs` tells a live run from a crash
        summary = _loop(cfg, run, engine, state, data, console)
        baseline = cfg.objective.baseline(data.train, data.vocab, cfg.data.seq_len)  # a reference figure beside ours
        summary.update({f"baseline_{k}": v for k, v in baseline.items()})
        if rt.main:
            runs.write_json(run.summary, summary)
    if rt.world > 1:  # leave together, DDP's reducer gone first: tearing down under it can abort a rank at exit
        del engine
        gc.collect()  # FSDP's and DDP's hooks hold the model in reference cycles: free them while the group lives
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _prepare(cfg: Config, run: runs.RunDir, rt: Runtime, console: Console, resume: bool) -> Prepared:
    """Tokenizer and token cache: each node's first rank builds them (once, on a shared file system: the
    build is atomic and a finished one is reused), the other ranks then reuse them; a resume keeps the run's
    tokenizer."""
    from pretrain.data import prepare

    data_cfg = dataclasses.replace(cfg.data, tokenizer=str(run.tokenizer)) if resume else cfg.data
    first = rt.local_rank == 0
    if rt.world > 1 and not first:
        dist.barrier()
    prepared = prepare(data_cfg, extra_pieces=cfg.objective.special_pieces, progress=rt.main, console=console)
    if rt.world > 1 and first:
        dist.barrier()
    return prepared


def _start(cfg: Config, run: runs.RunDir, rt: Runtime, mode: str, prepared: Prepared,
           start: Start) -> tuple[Engine, TrainState]:
    """The model (sharded under FSDP), optimizer and grad scaler, restored from the newest checkpoint on a
    resume; a new run folder otherwise, its weights from `start.init_from` when given. The DDP / compile
    wrapper goes on last."""
    vocab_size = prepared.tokenizer.vocab.size
    model = runs.build_model(cfg, vocab_size)
    if start.init_from is not None and not start.resume:  # every rank alike, before sharding and the first step
        from pretrain.hf_import import load_into

        load_into(model, start.init_from, cfg)
    model = model.to(rt.device)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if mode == "fsdp":
        parallel.shard(model, cfg.train)
        rt.amp_dtype = None  # FSDP's mixed-precision policy casts the parameters itself
    opt = build_optimizer(model, cfg.train, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.train.precision == "fp16")
    engine = Engine(rt, model, model, opt, scaler, mode)
    if start.resume:
        state = ckpt.restore_training(run.checkpoints, engine, runs.fingerprint(cfg, vocab_size))
    else:
        state = TrainState()
        if rt.main:
            runs.create(run, cfg, start.sources, prepared.tokenizer.path, prepared.cache.path, prepared.cache.meta)
    parallel.wrap(engine, cfg.train.compile)
    return engine, state


def _loop(cfg: Config, run: runs.RunDir, engine: Engine, state: TrainState, data: Data, console: Console) -> dict:
    """The training loop proper (see the module docstring for the order of one step)."""
    tc, obj, rt = cfg.train, cfg.objective, engine.rt
    plan = BatchPlan.of(cfg, rt.world)
    hz, start = Horizon(tc, _horizon(cfg, plan), state, _agree(rt)), state.step
    batches = loader(cfg, data, plan, rt, start, hz.cap)
    log = TrainLog(cfg, engine, run if rt.main else None, console, state, hz.steps)
    saver = _Saver(cfg, run, engine, state, console)
    stop, t_start = "max_steps", time.perf_counter() - state.elapsed
    spent = hz.exhausted(state)  # a token or time budget spent (checked after every step)
    with log, Interrupts(enabled=rt.world == 1) as ctrl_c:
        while state.step < hz.cap:
            step = state.step
            if spent:
                stop = spent
                break
            set_lr(engine.opt, tc, plan.lr_clock(step), plan.lr_clock(hz.steps))
            if tc.eval_every and step % tc.eval_every == 0 and step > start:  # maybe eval
                _eval_and_log(engine, cfg, data, state, log)
                if tc.patience and state.bad_evals >= tc.patience:
                    stop = "plateau"
                    break
            rng, t_step = ckpt.rng_state(), time.perf_counter()
            try:
                gnorm, step_tokens = train_step(obj, engine, [next(batches) for _ in range(plan.local(step))], tc,
                                                log.meter, log.on_micro(step, plan.local(step), then=ctrl_c.check))
            except KeyboardInterrupt:  # checkpoint the steps done (with the RNG as the step began): exact resume
                saver.interrupted(None if ctrl_c.forced else rng, start)
                raise
            if not engine.scaler.is_enabled() and not torch.isfinite(gnorm):
                raise saver.non_finite(f"non-finite loss or gradient at step {step + 1}")
            state.step, state.tokens = state.step + 1, state.tokens + step_tokens
            state.elapsed = time.perf_counter() - t_start
            spent = hz.exhausted(state)
            if hz.observe(state, time.perf_counter() - t_step):  # the time budget's horizon, frozen from now on
                _froze(run, hz, log, rt)
            log.step(state, engine.opt.param_groups[0]["lr"], float(gnorm), step_tokens,
                     last=bool(spent) or state.step >= hz.cap)
            if ctrl_c.pending:  # pressed during the optimizer update: the step is complete now, save it
                saver.interrupted(ckpt.rng_state(), start)
                raise KeyboardInterrupt
            if tc.ckpt_every and state.step % tc.ckpt_every == 0:  # maybe checkpoint
                with log.paused():
                    saver.save()
        last_eval = _eval_and_log(engine, cfg, data, state, log)
    state.elapsed = time.perf_counter() - t_start
    if saver.saved_step != state.step:
        saver.save()
    return {"steps": state.step, "tokens": state.tokens, "seconds": state.elapsed, "stopped_by": stop,
            "horizon": hz.steps, "horizon_from": hz.source,
            "tokens_per_s": state.tokens / max(state.elapsed, 1e-9), **log.summary(),
            **{f"val_{k}": v for k, v in last_eval.items()}, "run_dir": str(run.path)}


class _Saver:
    """The checkpoints of a training run (every rank takes part under FSDP; rank 0 alone writes otherwise)
    and what the loop says about them when it stops early."""

    def __init__(self, cfg: Config, run: runs.RunDir, engine: Engine, state: TrainState, console: Console):
        self.run, self.state, self.console = run, state, console
        self.main, self.world = engine.rt.main, engine.rt.world
        identity = {"fingerprint": runs.fingerprint(cfg, engine.model.vocab_size),
                    "global_batch": cfg.train.global_batch}
        self._save = functools.partial(ckpt.save_training, run.checkpoints, engine, state, identity,
                                       cfg.train.keep_last)
        self.last: Path | None = None  # the newest checkpoint saved (on rank 0)
        self.saved_step = -1  # its step (on every rank: they save together)

    def save(self, rng: dict | None = None) -> None:
        """Checkpoint the current step (`rng`: this rank's RNG to save, default the current one)."""
        try:
            self.last = self._save(rng)
        except ckpt.NonFinite as e:
            raise self.non_finite(str(e)) from None
        self.saved_step = self.state.step

    def non_finite(self, what: str) -> UserError:
        """The error that stops a run whose loss, gradients or weights stopped being finite."""
        where = f"the last good checkpoint is {self.last}" if self.last else "no checkpoint was written yet"
        return UserError(f"{what}; stopped ({where}); lower train.lr, raise train.warmup_steps or use "
                         "train.precision=fp32")

    def interrupted(self, rng: dict | None, start: int) -> None:
        """Ctrl-C: save the finished steps with `rng` (None: a forced stop, nothing consistent to save). Under
        torchrun every rank stops at its own point, so no collective save is attempted: the newest checkpoint
        stays the one to resume from."""
        if rng is not None and self.state.step > start and self.world == 1:
            self.save(rng)
        if self.main:
            self.console.print(f"saved {self.last}; continue with --resume {self.run.path}" if self.last else
                               "no step finished since the start, so there is nothing new to resume from",
                               markup=False)


def _horizon(cfg: Config, plan: BatchPlan) -> int:
    """The step budget: max_steps, or fewer when the token budget ends first. The loop never passes it; a time
    budget may end the schedule (and the run) sooner (pretrain/budget.py)."""
    tc = cfg.train
    return min(tc.max_steps, plan.steps_for_tokens(tc.max_tokens)) if tc.max_tokens else tc.max_steps


def _agree(rt: Runtime):
    """agree(value, "max" | "min"): the value all ranks agree on (so they stop at the same step and plan the same
    horizon); the value itself on one process."""
    def agree(value: float, op: str) -> float:
        if rt.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return float(t.item())

    return agree


def _froze(run: runs.RunDir, plan: Horizon, log: TrainLog, rt: Runtime) -> None:
    """A time budget's horizon was just frozen: the progress bar learns its end, config.json notes it."""
    log.set_horizon(plan.steps)
    if rt.main:
        runs.add_note(run, "horizon", plan.note())


def train_step(obj: Objective, engine: Engine, micro: list[Batch], tc: TrainConfig, meter: Meter,
               on_micro=lambda i: None) -> tuple[torch.Tensor, int]:
    """One optimizer step over this rank's micro-batches; returns the global gradient norm and the step's input
    tokens over all ranks. `on_micro(i)` is called after micro-batch i (1-based), so long accumulations show
    progress.

    A non-finite gradient norm is returned, not stepped on (the caller stops the run); with fp16 the
    GradScaler skips such steps itself and lowers its scale."""
    rt, scaler = engine.rt, engine.scaler
    counts, tokens = target_counts(obj, micro, rt)  # all-reduced before any backward: the one divisor per term
    for i, mb in enumerate(micro):  # forward, objective loss, backward
        mb = {k: v.to(rt.device, non_blocking=True) for k, v in mb.items()}
        with parallel.grad_sync(engine, last=i == len(micro) - 1):
            with rt.autocast():
                terms = obj.loss(engine.fwd, mb, tc.label_smoothing)
            loss = sum(terms[t][0] / counts[t] for t in obj.loss_terms) * rt.world  # DDP/FSDP average over ranks
            scaler.scale(loss).backward()
        meter.add({k: (s.detach(), n) for k, (s, n) in terms.items()})
        on_micro(i + 1)
    scaler.unscale_(engine.opt)  # clip
    gnorm = parallel.clip(engine, tc.clip if tc.clip > 0 else float("inf"))
    if scaler.is_enabled() or torch.isfinite(gnorm):
        scaler.step(engine.opt)  # optimizer step
        scaler.update()
    engine.opt.zero_grad(set_to_none=True)
    return gnorm, tokens


def _eval_and_log(engine: Engine, cfg: Config, data: Data, state: TrainState, log: TrainLog) -> dict:
    """Evaluate on the validation split, log it, and track the early-stopping state."""
    with log.paused():
        res = evaluate(engine.model, cfg, data.valid, data.vocab, engine.rt, cfg.train.eval_batches)
    if res["loss"] < state.best_val - 1e-6:
        state.best_val, state.bad_evals = res["loss"], 0
    else:
        state.bad_evals += 1
    log.eval(state, res)
    return res
