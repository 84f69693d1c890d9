"""The one training loop every objective shares.

Order of one step: set LR -> maybe eval -> for each micro-batch: forward, objective loss, backward ->
all-reduce counts -> clip -> optimizer step -> log -> maybe checkpoint.

Loss averaging happens here and only here: each loss term's targets are counted from the batch (entries of
the field named in `objective.loss_terms` that are not IGNORE_INDEX), summed over the step's micro-batches
and all ranks, and every micro-batch's summed loss is divided by that global count before backward. So
1x8 and 4x2 accumulation give the same update, and so do 1 and N GPUs.

Budgets: max_steps, max_tokens and max_time (a wall-clock budget whose schedule horizon is estimated from the
measured step time, pretrain/budget.py); the first one spent ends the run.

Every batch is a pure function of (seed, step, micro-step, rank) (`objectives.base.make_generator`), and a
checkpoint stores the weights, optimizer, dropout RNG and the `TrainState`: a resumed run repeats an
uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from rich.console import Console

from objectives.base import IGNORE_INDEX, Batch, Objective, input_tokens, make_generator
from pretrain import checkpoint as ckpt
from pretrain import run as runs
from pretrain.budget import Horizon
from pretrain.checkpoint import TrainState
from pretrain.errors import UserError
from pretrain.evaluate import evaluate
from pretrain.metrics import Meter, TrainLog
from pretrain.optim import build_optimizer, set_lr
from pretrain.runlist import running
from pretrain.runtime import Engine, Runtime, setup_runtime, warn_if_busy

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


class StepBatches(torch.utils.data.Dataset):
    """Item i is micro-batch (i mod accum) of step (start + i // accum): a pure function of its indices."""

    def __init__(self, cfg: Config, data: Data, rank: int, start: int, steps: int) -> None:
        self.cfg, self.data, self.rank, self.start, self.steps = cfg, data, rank, start, steps

    def __len__(self) -> int:
        return self.steps * self.cfg.train.grad_accum

    def __getitem__(self, i: int) -> Batch:
        tc = self.cfg.train
        step, micro = divmod(i, tc.grad_accum)
        gen = make_generator(tc.seed, "train", self.start + step, micro, self.rank)
        return self.cfg.objective.batch(self.data.train, self.data.vocab, gen, tc.batch_size, self.cfg.data.seq_len)


def worker_init(_: int) -> None:
    """DataLoader workers build batches with one thread each, so they never fight the main process."""
    torch.set_num_threads(1)


def target_counts(objective: Objective, batches: list[Batch], rt: Runtime) -> dict[str, torch.Tensor]:
    """Per loss term: targets over all micro-batches and ranks (the one divisor of each term)."""
    counts = torch.tensor([[float((b[f] != IGNORE_INDEX).sum()) for f in objective.loss_terms.values()]
                           for b in batches]).sum(0).to(rt.device)
    if rt.world > 1:
        dist.all_reduce(counts)
    return dict(zip(objective.loss_terms, counts.clamp(min=1), strict=True))


# ---------------------------------------------------------------------------------------------- the run


def train(cfg: Config, run_dir: Path, *, resume: bool = False, console: Console | None = None,
          sources: list | None = None) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there); returns the summary it prints."""
    console = console or Console()
    rt = setup_runtime(cfg.train)
    run = runs.RunDir(run_dir)
    if not resume and run.holds_run():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if rt.main:
        warn_if_busy(console)
    prepared = _prepare(cfg, run, rt, console, resume)
    data = Data(prepared.tokenizer.vocab, prepared.cache.split("train"), prepared.cache.split("valid"))
    engine, state = _start(cfg, run, rt, prepared, resume, sources or [])
    with running(run) if rt.main else contextlib.nullcontext():  # `pretrain runs` tells a live run from a crash
        summary = _loop(cfg, run, engine, state, data, console)
        baseline = cfg.objective.baseline(data.train, data.vocab, cfg.data.seq_len)  # a reference figure beside ours
        summary.update({f"baseline_{k}": v for k, v in baseline.items()})
        if rt.main:
            runs.write_json(run.summary, summary)
    if rt.world > 1:  # leave together, DDP's reducer gone first: tearing down under it can abort a rank at exit
        del engine
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _prepare(cfg: Config, run: runs.RunDir, rt: Runtime, console: Console, resume: bool) -> Prepared:
    """Tokenizer and token cache (rank 0 builds, the others then reuse it); a resume keeps the run's tokenizer."""
    from pretrain.data import prepare

    data_cfg = dataclasses.replace(cfg.data, tokenizer=str(run.tokenizer)) if resume else cfg.data
    if rt.world > 1 and not rt.main:
        dist.barrier()
    prepared = prepare(data_cfg, extra_pieces=cfg.objective.special_pieces, progress=rt.main, console=console)
    if rt.world > 1 and rt.main:
        dist.barrier()
    return prepared


def _start(cfg: Config, run: runs.RunDir, rt: Runtime, prepared: Prepared, resume: bool,
           sources: list) -> tuple[Engine, TrainState]:
    """The model, optimizer and grad scaler, restored from the newest checkpoint on a resume; a new run
    folder otherwise. The DDP / compile wrapper goes on last."""
    vocab_size = prepared.tokenizer.vocab.size
    model = runs.build_model(cfg, vocab_size).to(rt.device)
    opt = build_optimizer(model, cfg.train, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.train.precision == "fp16")
    engine = Engine(rt, model, model, opt, scaler)
    if resume:
        state = ckpt.restore_training(run.checkpoints, engine, runs.fingerprint(cfg, vocab_size))
    else:
        state = TrainState()
        if rt.main:
            runs.create(run, cfg, sources, prepared.tokenizer.path, prepared.cache.meta)
    if rt.world > 1:
        engine.fwd = torch.nn.parallel.DistributedDataParallel(model)
    if cfg.train.compile:
        engine.fwd = torch.compile(engine.fwd)
    return engine, state


def _loop(cfg: Config, run: runs.RunDir, engine: Engine, state: TrainState, data: Data, console: Console) -> dict:
    """The training loop proper (see the module docstring for the order of one step)."""
    tc, obj, rt = cfg.train, cfg.objective, engine.rt
    plan, start = Horizon(tc, _horizon(cfg, rt.world), state, _agree(rt)), state.step
    batches = _batches(cfg, data, rt, start, plan.cap)
    log = TrainLog(cfg, engine, run if rt.main else None, console, state, plan.steps)
    save = functools.partial(ckpt.save_training, run.checkpoints, engine, state,
                             runs.fingerprint(cfg, data.vocab.size), tc.keep_last)
    stop, last_ckpt, t_start = "max_steps", None, time.perf_counter() - state.elapsed
    spent = plan.exhausted(state)  # a token or time budget spent (checked after every step)
    with log:
        while state.step < plan.cap:
            step = state.step
            if spent:
                stop = spent
                break
            set_lr(engine.opt, tc, step, plan.steps)
            if tc.eval_every and step % tc.eval_every == 0 and step > start:  # maybe eval
                _eval_and_log(engine, cfg, data, state, log)
                if tc.patience and state.bad_evals >= tc.patience:
                    stop = "plateau"
                    break
            rng, t_step = ckpt.rng_state(), time.perf_counter()
            try:
                gnorm, step_tokens = train_step(obj, engine, [next(batches) for _ in range(tc.grad_accum)], tc,
                                                log.meter, log.on_micro(step))
            except KeyboardInterrupt:  # checkpoint the steps done (with the RNG as the step began): exact resume
                last_ckpt = save(rng) if rt.main and state.step > start else last_ckpt
                if rt.main:
                    console.print(f"saved {last_ckpt}; continue with --resume {run.path}" if last_ckpt else
                                  "no step finished since the start, so there is nothing new to resume from")
                raise
            if not engine.scaler.is_enabled() and not torch.isfinite(gnorm):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise UserError(f"non-finite loss or gradient at step {step + 1}; stopped ({where}); lower train.lr, "
                                "raise train.warmup_steps or use train.precision=fp32")
            state.step, state.tokens = state.step + 1, state.tokens + step_tokens
            state.elapsed = time.perf_counter() - t_start
            spent = plan.exhausted(state)
            if plan.observe(state, time.perf_counter() - t_step):  # the time budget's horizon, frozen from now on
                _froze(run, plan, log, rt)
            log.step(state, engine.opt.param_groups[0]["lr"], float(gnorm), step_tokens,
                     last=bool(spent) or state.step >= plan.cap)
            if tc.ckpt_every and state.step % tc.ckpt_every == 0 and rt.main:  # maybe checkpoint
                last_ckpt = save()
        last_eval = _eval_and_log(engine, cfg, data, state, log)
    state.elapsed = time.perf_counter() - t_start
    if rt.main and (last_ckpt is None or not last_ckpt.name.endswith(f"{state.step:07d}")):
        save()
    return {"steps": state.step, "tokens": state.tokens, "seconds": state.elapsed, "stopped_by": stop,
            "horizon": plan.steps, "horizon_from": plan.source,
            "tokens_per_s": state.tokens / max(state.elapsed, 1e-9), **log.summary(),
            **{f"val_{k}": v for k, v in last_eval.items()}, "run_dir": str(run.path)}


def _horizon(cfg: Config, world: int) -> int:
    """The step budget: max_steps, or fewer when the token budget ends first. The loop never passes it; a time
    budget may end the schedule (and the run) sooner (pretrain/budget.py)."""
    tc = cfg.train
    nominal = tc.batch_size * tc.grad_accum * world * cfg.data.seq_len
    return min(tc.max_steps, math.ceil(tc.max_tokens / nominal)) if tc.max_tokens else tc.max_steps


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


def _batches(cfg: Config, data: Data, rt: Runtime, start: int, horizon: int):
    """An iterator over the micro-batches of steps start..horizon-1, built in DataLoader workers."""
    tc = cfg.train
    loader = torch.utils.data.DataLoader(
        StepBatches(cfg, data, rt.rank, start, max(0, horizon - start)), batch_size=None,
        num_workers=tc.num_workers, worker_init_fn=worker_init, pin_memory=rt.device.type == "cuda",
        prefetch_factor=4 if tc.num_workers else None, generator=torch.Generator().manual_seed(0))
    return iter(loader)


def train_step(obj: Objective, engine: Engine, micro: list[Batch], tc: TrainConfig, meter: Meter,
               on_micro=lambda i: None) -> tuple[torch.Tensor, int]:
    """One optimizer step over the step's micro-batches; returns the gradient norm and the input tokens.
    `on_micro(i)` is called after micro-batch i (1-based), so long accumulations show progress.

    A non-finite gradient norm is returned, not stepped on (the caller stops the run); with fp16 the
    GradScaler skips such steps itself and lowers its scale."""
    rt, scaler = engine.rt, engine.scaler
    counts = target_counts(obj, micro, rt)  # all-reduced before any backward: the one divisor per term
    tokens = 0
    for i, mb in enumerate(micro):  # forward, objective loss, backward
        mb = {k: v.to(rt.device, non_blocking=True) for k, v in mb.items()}
        sync = engine.fwd.no_sync() if rt.world > 1 and i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                terms = obj.loss(engine.fwd, mb, tc.label_smoothing)
            loss = sum(terms[t][0] / counts[t] for t in obj.loss_terms) * rt.world  # DDP averages over ranks
            scaler.scale(loss).backward()
        meter.add({k: (s.detach(), n) for k, (s, n) in terms.items()})
        tokens += input_tokens(mb) * rt.world
        on_micro(i + 1)
    scaler.unscale_(engine.opt)  # clip
    gnorm = torch.nn.utils.clip_grad_norm_(engine.model.parameters(), tc.clip if tc.clip > 0 else float("inf"))
    if scaler.is_enabled() or torch.isfinite(gnorm):
        scaler.step(engine.opt)  # optimizer step
        scaler.update()
    engine.opt.zero_grad(set_to_none=True)
    return gnorm, tokens


def _eval_and_log(engine: Engine, cfg: Config, data: Data, state: TrainState, log: TrainLog) -> dict:
    """Evaluate on the validation split, log it, and track the early-stopping state."""
    res = evaluate(engine.model, cfg, data.valid, data.vocab, engine.rt, cfg.train.eval_batches)
    if res["loss"] < state.best_val - 1e-6:
        state.best_val, state.bad_evals = res["loss"], 0
    else:
        state.bad_evals += 1
    log.eval(state, res)
    return res
