"""The one training loop every objective shares.

Order of one step (DESIGN.md): set LR -> maybe eval -> for each micro-batch: forward, objective loss,
backward -> all-reduce counts -> clip -> optimizer step -> log -> maybe checkpoint.

Loss averaging happens here and only here: each loss term's targets are counted from the batch (entries of
the field named in `objective.loss_terms` that are not IGNORE_INDEX), summed over the step's micro-batches
and all ranks, and every micro-batch's summed loss is divided by that global count before backward. So
1x8 and 4x2 accumulation give the same update, and so do 1 and N GPUs.

Every batch is a pure function of (seed, step, micro-step, rank) (`objectives.base.make_generator`), and a
checkpoint stores the weights, optimizer, dropout RNG and step: a resumed run repeats an uninterrupted
one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from objectives.base import IGNORE_INDEX, input_tokens, make_generator
from pretrain import checkpoint as ckpt
from pretrain.config import Config, TrainConfig
from pretrain.errors import UserError
from pretrain.metrics import JsonlLog, Meter, measure_peak_flops

EVAL_SEED = 20240101  # fixed: every run evaluates on the same validation batches, whatever its train seed


# ---------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where and how we compute: device, autocast dtype, distributed rank and world size."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(tcfg: TrainConfig) -> Runtime:
    """Pick the device (CUDA, else MPS, else CPU), join torchrun's process group when there is one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    want = tcfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible; use --set train.device=auto or cpu")
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.precision]
    return Runtime(device=device, amp_dtype=amp, rank=rank, world=world)


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


def worker_init(_: int) -> None:
    """DataLoader workers build batches with one thread each, so they never fight the main process."""
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- model, optimizer


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The backbone in the arrangement the objective asks for, with the recipe's sizes."""
    from models.transformer import Transformer

    need = cfg.objective.positions_needed(cfg.data.seq_len)
    if need > cfg.model.max_len:
        raise UserError(f"the objective needs sequences of {need} tokens but model.max_len is {cfg.model.max_len}; "
                        f"raise model.max_len or lower data.seq_len")
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model, cfg.objective.arch, vocab_size)


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (no decay on biases, norms, embeddings; fused on CUDA), Adafactor or SGD with momentum."""
    no_decay: set[int] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) or "norm" in type(m).__name__.lower():
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in no_decay]
    rest = [p for p in params if not (p.dim() >= 2 and id(p) not in no_decay)]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if tcfg.optimizer == "adamw":
        extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, **extra)
    if tcfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=tcfg.lr)
    return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)


def lr_factor(step: int, tcfg: TrainConfig, horizon: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    w = tcfg.warmup_steps
    if step < w:
        return (step + 1) / w
    if tcfg.schedule == "constant":
        return 1.0
    if tcfg.schedule == "inverse_sqrt":  # Vaswani et al.: lr ~ 1/sqrt(step), continuous at the end of warmup
        return math.sqrt(max(w, 1)) / math.sqrt(step + 1)
    p = min(1.0, (step - w) / max(1, horizon - w))
    floor = tcfg.min_lr_ratio
    if tcfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return floor + (1 - floor) * (1 - p)  # linear


# ---------------------------------------------------------------------------------------------- data


class StepBatches(torch.utils.data.Dataset):
    """Item i is micro-batch (i mod accum) of step (start + i // accum): a pure function of its indices."""

    def __init__(self, cfg: Config, split: Any, vocab: Any, rank: int, start: int, steps: int) -> None:
        self.cfg, self.split, self.vocab, self.rank, self.start, self.steps = cfg, split, vocab, rank, start, steps

    def __len__(self) -> int:
        return self.steps * self.cfg.train.grad_accum

    def __getitem__(self, i: int) -> dict:
        step, micro = divmod(i, self.cfg.train.grad_accum)
        gen = make_generator(self.cfg.train.seed, "train", self.start + step, micro, self.rank)
        return self.cfg.objective.batch(self.split, self.vocab, gen, self.cfg.train.batch_size, self.cfg.data.seq_len)


def target_counts(objective: Any, batches: list[dict], rt: Runtime) -> dict[str, torch.Tensor]:
    """Per loss term: targets over all micro-batches and ranks (the one divisor of each term)."""
    counts = torch.tensor([[float((b[f] != IGNORE_INDEX).sum()) for f in objective.loss_terms.values()]
                           for b in batches]).sum(0).to(rt.device)
    if rt.world > 1:
        dist.all_reduce(counts)
    return dict(zip(objective.loss_terms, counts.clamp(min=1), strict=True))


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, split: Any, vocab: Any, rt: Runtime, n_batches: int,
             batch_size: int | None = None) -> dict[str, float]:
    """Mean of every reported term over `n_batches` fixed-seed validation batches, plus loss, perplexity,
    bits per byte (total nats of the main loss term / (ln 2 x UTF-8 bytes of its targets)), tokens, bytes."""
    obj = cfg.objective
    main_term, main_field = next(iter(obj.loss_terms.items()))
    was_training = model.training
    model.eval()
    meter, n_bytes = Meter(), 0
    bs = batch_size or cfg.train.batch_size
    for i in range(n_batches):
        b = obj.batch(split, vocab, make_generator(EVAL_SEED, "eval", i, rt.rank), bs, cfg.data.seq_len)
        labels = b[main_field]
        n_bytes += int(vocab.piece_bytes_t[labels[labels != IGNORE_INDEX]].sum())
        b = {k: v.to(rt.device, non_blocking=True) for k, v in b.items()}
        with rt.autocast():
            meter.add(obj.loss(model, b))
    model.train(was_training)
    sums = torch.tensor([meter.sums[k] for k in meter.sums] + [meter.counts[k] for k in meter.sums] + [n_bytes],
                        dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        dist.all_reduce(sums)
    keys = list(meter.sums)
    s, c, n_bytes = sums[: len(keys)].tolist(), sums[len(keys): 2 * len(keys)].tolist(), sums[-1].item()
    out = {k: s[i] / max(c[i], 1) for i, k in enumerate(keys)}
    main = keys.index(main_term)
    out["loss"] = out[main_term]
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["bits_per_byte"] = s[main] / (math.log(2) * n_bytes) if n_bytes else float("nan")
    out["tokens"] = int(c[main])
    out["bytes"] = int(n_bytes)
    return out


# ---------------------------------------------------------------------------------------------- the run


def _fingerprint(cfg: Config, vocab_size: int) -> dict:
    """What a checkpoint's weights depend on: a resume must match it exactly."""
    import dataclasses

    return {"model": cfg.to_dict()["model"], "arch": dataclasses.asdict(cfg.objective.arch), "vocab_size": vocab_size}


def _prepare(cfg: Config, run_dir: Path, rt: Runtime, console: Console, use_run_tokenizer: bool) -> Any:
    """Tokenizer and token cache (rank 0 builds, the others then reuse it)."""
    import dataclasses

    from pretrain.data import prepare

    data_cfg = cfg.data
    if use_run_tokenizer:
        data_cfg = dataclasses.replace(cfg.data, tokenizer=str(run_dir / "tokenizer.model"))
    if rt.world > 1 and not rt.main:
        dist.barrier()
    prepared = prepare(data_cfg, progress=rt.main, console=console)
    if rt.world > 1 and rt.main:
        dist.barrier()
    return prepared


def train(cfg: Config, run_dir: Path, *, resume: bool = False, console: Console | None = None,
          sources: list | None = None) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there); returns the summary it prints."""
    import json
    import shutil

    console = console or Console()
    rt = setup_runtime(cfg.train)
    run_dir = Path(run_dir)
    if not resume and (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if rt.main:
        warn_if_busy(console)
    prepared = _prepare(cfg, run_dir, rt, console, use_run_tokenizer=resume)
    vocab = prepared.tokenizer.vocab
    train_split, valid_split = prepared.cache.split("train"), prepared.cache.split("valid")
    model = build_model(cfg, vocab.size).to(rt.device)
    opt = build_optimizer(model, cfg.train, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=cfg.train.precision == "fp16")
    state = {"step": 0, "tokens": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0,
             "fingerprint": _fingerprint(cfg, vocab.size)}
    if resume:
        state = ckpt.restore_training(run_dir, model, opt, scaler, state["fingerprint"])
    elif rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "sources": sources or []}, indent=2))
        shutil.copyfile(prepared.tokenizer.path, run_dir / "tokenizer.model")
        (run_dir / "data.json").write_text(json.dumps(prepared.cache.meta, indent=2, default=str))
    fwd = torch.nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
    if cfg.train.compile:
        fwd = torch.compile(fwd)
    summary = _loop(cfg, run_dir, rt, model, fwd, opt, scaler, state, train_split, valid_split, vocab, console)
    # a reference figure printed beside ours, fit on the training split
    baseline = getattr(cfg.objective, "baseline", lambda *_, **__: {})(train_split, vocab, seq_len=cfg.data.seq_len)
    summary.update({f"baseline_{k}": v for k, v in baseline.items()})
    if rt.main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if rt.world > 1:  # leave together, DDP's reducer gone first: tearing down under it can abort a rank at exit
        del fwd
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _loop(cfg: Config, run_dir: Path, rt: Runtime, model: torch.nn.Module, fwd: torch.nn.Module,
          opt: torch.optim.Optimizer, scaler: Any, state: dict, train_split: Any, valid_split: Any, vocab: Any,
          console: Console) -> dict:
    """The training loop proper (see the module docstring for the order of one step)."""
    tc, obj = cfg.train, cfg.objective
    nominal = tc.batch_size * tc.grad_accum * rt.world * cfg.data.seq_len
    horizon = min(tc.max_steps, math.ceil(tc.max_tokens / nominal)) if tc.max_tokens else tc.max_steps
    start = state["step"]
    loader = torch.utils.data.DataLoader(
        StepBatches(cfg, train_split, vocab, rt.rank, start, max(0, horizon - start)), batch_size=None,
        num_workers=tc.num_workers, worker_init_fn=worker_init, pin_memory=rt.device.type == "cuda",
        prefetch_factor=4 if tc.num_workers else None, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    log = JsonlLog(run_dir / "metrics.jsonl") if rt.main else None
    peak = measure_peak_flops(rt.device, rt.amp_dtype)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    meter, last_eval, last_ckpt = Meter(), {}, None
    interval_t, interval_tok, t_start = time.perf_counter(), 0, time.perf_counter() - state["elapsed"]
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not rt.main)
    task = progress.add_task(f"{obj.name}", total=horizon, completed=start, info="")
    stop_reason, recs = "max_steps", []  # recs: this session's log records, for the summary
    with progress:
        while state["step"] < horizon:
            step = state["step"]
            if tc.max_tokens and state["tokens"] >= tc.max_tokens:
                stop_reason = "max_tokens"
                break
            for g in opt.param_groups:  # set LR
                g["lr"] = tc.lr * lr_factor(step, tc, horizon)
            if tc.eval_every and step % tc.eval_every == 0 and step > start:  # maybe eval
                last_eval = _eval_and_log(model, cfg, valid_split, vocab, rt, state, log, console, progress)
                if tc.patience and state["bad_evals"] >= tc.patience:
                    stop_reason = "plateau"
                    break
            show = functools.partial(_show_micro, progress, task, step, tc.grad_accum)
            rng = ckpt.rng_state()
            try:
                gnorm, step_tokens = _step(obj, fwd, model, opt, scaler,
                                           [next(batches) for _ in range(tc.grad_accum)], rt, tc, meter, show)
            except KeyboardInterrupt:  # checkpoint the steps done (with the RNG as the step began): exact resume
                if rt.main and state["step"] > start:
                    last_ckpt = ckpt.save_training(run_dir, model, opt, scaler, state, tc.keep_last, rng)
                if rt.main:
                    console.print(f"saved {last_ckpt}; continue with --resume {run_dir}" if last_ckpt else
                                  "no step finished since the start, so there is nothing new to resume from")
                raise
            if not scaler.is_enabled() and not torch.isfinite(gnorm):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise UserError(f"non-finite loss or gradient at step {step + 1}; stopped ({where}); lower train.lr, "
                                "raise train.warmup_steps or use train.precision=fp32")
            state["step"] += 1
            state["tokens"] += step_tokens
            interval_tok += step_tokens
            if state["step"] % tc.log_every == 0 or state["step"] == horizon:  # log
                dt = time.perf_counter() - interval_t
                rec = {"step": state["step"], "tokens": state["tokens"], **meter.means(),
                       "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm), "tokens_per_s": interval_tok / dt,
                       "mfu": flops_per_token * interval_tok / dt / rt.world / peak,
                       "elapsed": time.perf_counter() - t_start}
                if log:
                    log.write(rec)
                recs.append(rec)
                main = next(iter(obj.loss_terms))
                progress.update(task, completed=state["step"], info=f"loss {rec.get(main, float('nan')):.4f} "
                                f"lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s mfu {rec['mfu']:.1%}")
                meter, interval_t, interval_tok = Meter(), time.perf_counter(), 0
            state["elapsed"] = time.perf_counter() - t_start
            if tc.ckpt_every and state["step"] % tc.ckpt_every == 0 and rt.main:  # maybe checkpoint
                last_ckpt = ckpt.save_training(run_dir, model, opt, scaler, state, tc.keep_last)
        last_eval = _eval_and_log(model, cfg, valid_split, vocab, rt, state, log, console, progress)
    state["elapsed"] = time.perf_counter() - t_start
    if rt.main and (last_ckpt is None or not last_ckpt.name.endswith(f"{state['step']:07d}")):
        last_ckpt = ckpt.save_training(run_dir, model, opt, scaler, state, tc.keep_last)
    out = {"steps": state["step"], "tokens": state["tokens"], "seconds": state["elapsed"], "stopped_by": stop_reason,
           "train_loss": (recs[-1] if recs else {}).get(next(iter(obj.loss_terms)), float("nan")),
           "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9),
           "mfu": sum(r["mfu"] for r in recs) / len(recs) if recs else float("nan"), "peak_flops": peak,
           **{f"val_{k}": v for k, v in last_eval.items()}, "run_dir": str(run_dir)}
    return out


def _show_micro(progress: Progress, task: Any, step: int, accum: int, i: int) -> None:
    progress.update(task, completed=step + i / accum)


def _step(obj: Any, fwd: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any,
          micro: list[dict], rt: Runtime, tc: TrainConfig, meter: Meter,
          on_micro: Any = lambda i: None) -> tuple[torch.Tensor, int]:
    """One optimizer step over the step's micro-batches; returns the gradient norm and the input tokens.
    `on_micro(i)` is called after micro-batch i (1-based), so long accumulations show progress.

    A non-finite gradient norm is returned, not stepped on (the caller stops the run); with fp16 the
    GradScaler skips such steps itself and lowers its scale."""
    counts = target_counts(obj, micro, rt)  # all-reduced before any backward: the one divisor per term
    tokens = 0
    for i, mb in enumerate(micro):  # forward, objective loss, backward
        mb = {k: v.to(rt.device, non_blocking=True) for k, v in mb.items()}
        sync = fwd.no_sync() if rt.world > 1 and i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                terms = obj.loss(fwd, mb, tc.label_smoothing)
            loss = sum(terms[t][0] / counts[t] for t in obj.loss_terms) * rt.world  # DDP averages over ranks
            scaler.scale(loss).backward()
        meter.add({k: (s.detach(), n) for k, (s, n) in terms.items()})
        tokens += input_tokens(mb) * rt.world
        on_micro(i + 1)
    scaler.unscale_(opt)  # clip
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip if tc.clip > 0 else float("inf"))
    if scaler.is_enabled() or torch.isfinite(gnorm):
        scaler.step(opt)  # optimizer step
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return gnorm, tokens


def _eval_and_log(model: torch.nn.Module, cfg: Config, split: Any, vocab: Any, rt: Runtime, state: dict,
                  log: JsonlLog | None, console: Console, progress: Progress) -> dict:
    """Evaluate, write a `split: valid` metrics line, and track the early-stopping state."""
    res = evaluate(model, cfg, split, vocab, rt, cfg.train.eval_batches)
    if res["loss"] < state["best_val"] - 1e-6:
        state["best_val"], state["bad_evals"] = res["loss"], 0
    else:
        state["bad_evals"] += 1
    if log:
        log.write({"step": state["step"], "tokens": state["tokens"], "split": "valid", **res})
        progress.console.print(f"step {state['step']:>6}  valid loss {res['loss']:.4f}  ppl {res['perplexity']:.2f}  "
                               f"bits/byte {res['bits_per_byte']:.3f}")
    return res
