"""`pretrain compare`: train several objectives (or recipes) on one tokenizer and one token cache at an equal budget,
evaluate and probe every run, and write one `pretrain report` that opens with the comparison table.

Entries. `--objectives clm,mlm,span,denoise` trains each objective's default (CPU-sized) recipe; `--recipes
bert-tiny,roberta-tiny` names recipes (or .toml files) instead, which is how two settings of one objective
compare (BERT's NSP pairs against RoBERTa's full-sentence packing). `--seeds K` trains each entry K times, at
train.seed, train.seed + 1, ...

One tokenizer, one cache. The first entry's data settings (with `--data` and `--set data.*`) are every run's: the
tokenizer is trained once with every entry's special pieces and given to every run as data.tokenizer, so all
runs read one token cache. Each recipe keeps its own data.seq_len unless `--set data.seq_len=N` sets one.

Budget (`--tokens N`, or `--flops F`): every run trains the whole number of optimizer steps that spends it, and
its learning-rate schedule ends there (train.max_steps; train.max_tokens and max_time are cleared).
- tokens: input tokens as the trainer counts them (`objectives.base.input_tokens`: the real, non-pad tokens the
  encoder, or a decoder-only model, reads). Batches are pure functions of (seed, step), so the run's own batches
  are drawn step by step (as the trainer will draw them) until they hold N input tokens: that many steps (past
  EXACT_STEPS steps the rest is extrapolated from their mean). Objectives differ in what a step holds: BERT pads
  its short pairs, the prefix LM's inputs are half a window, a span-corruption input of 128 tokens hides 141 raw
  ones and BART's inputs are a block shortened by its masks.
- flops: training FLOPs as MFU counts them (`Transformer.flops_per_token`, the objective's decoder length), over
  every position of every row, padding included (it costs compute): steps = ceil(F / FLOPs per step).
A recipe's warmup longer than a fifth of those steps is cut to a tenth of them (said in the plan). The table
shows what each run trained: steps, input tokens, FLOPs.

Measured per run: `pretrain eval` on the validation split (fixed-seed batches, so every run sees the same draws)
and `pretrain probe` (pretrain/probe.py). Bits per byte compare across objectives only for those that score the
whole text (`Objective.scores_whole_text`, the causal LM); for the others each objective's own loss and
accuracy are shown. With several seeds a figure is the mean ± the standard deviation over the runs; with one,
the probe's spread is over its own seeds.

A second `pretrain compare` with the same --out continues: finished runs (same config) are kept, an interrupted
one resumes from its checkpoint, evaluations and probes already written are reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError

EXACT_STEPS = 2000  # steps whose batches are drawn to count a token budget exactly; beyond, it is extrapolated
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.max_time")


@dataclass(frozen=True)
class Planned:
    """One run of the comparison: its entry, seed, config (budget set) and folder, and what a step costs."""

    label: str
    seed: int
    cfg: Any
    run_dir: Path
    tokens_per_step: float
    flops_per_step: float


def entries(objectives: list[str], recipes: list[str], data: str | None, sets: list[str]) -> list[tuple[str, Any]]:
    """(label, Config) of every entry, the budget not yet set; a UserError for bad names or repeated labels."""
    from pretrain.config import resolve, split_set

    if bool(objectives) == bool(recipes):
        raise UserError("give --objectives clm,mlm,... (each objective's default recipe) or --recipes NAME,..., "
                        "one of them")
    for item in sets:
        key = split_set(item)[0]
        if key in BUDGET_KEYS:
            raise UserError(f"--set {key}: compare sets every run's budget; give --tokens N or --flops F")
        if key.split(".")[0] not in ("data", "train", "model"):
            raise UserError(f"--set {key}: compare takes data.*, train.* and model.* settings for every run, and "
                            "probe.* for the probe; other objective settings need a recipe of their own (--recipes)")
    out = []
    for name in objectives or recipes:
        obj, recipe = (name, None) if objectives else (None, name)
        cfg, _ = resolve(recipe=recipe, objective=obj, flags={"data.source": data}, sets=sets)
        out.append((name if objectives else Path(name).stem, cfg))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise UserError(f"compare entries repeat ({', '.join(labels)}); name each once")
    return out


def shared_data(items: list[tuple[str, Any]], sets: list[str], console: Any):
    """Every entry on the first one's data settings and one tokenizer (with all their special pieces): returns the
    entries with data.tokenizer set and the prepared tokenizer and cache."""
    from pretrain.config import split_set
    from pretrain.data import prepare

    first = items[0][1].data
    pieces = tuple(dict.fromkeys(p for _, cfg in items for p in cfg.objective.special_pieces))
    prepared = prepare(first, extra_pieces=pieces, progress=True, console=console)
    own_len = not any(split_set(s)[0] == "data.seq_len" for s in sets)
    out = []
    for label, cfg in items:
        data = dataclasses.replace(first, tokenizer=str(prepared.tokenizer.path),
                                   seq_len=cfg.data.seq_len if own_len else first.seq_len)
        out.append((label, dataclasses.replace(cfg, data=data)))
    return out, prepared


def flops_per_step(cfg: Any, prepared: Any) -> float:
    """Training FLOPs of one optimizer step of `cfg`, over every position of every row."""
    from pretrain.batches import BatchPlan
    from pretrain.run import build_model

    seq = cfg.data.seq_len
    model = build_model(cfg, prepared.tokenizer.size)
    per_token = model.flops_per_token(seq, cfg.objective.decoder_length(seq))
    return per_token * seq * cfg.train.batch_size * BatchPlan.of(cfg, 1).full


def steps_for_tokens(cfg: Any, prepared: Any, budget: float, limit: int = EXACT_STEPS) -> tuple[int, float]:
    """(steps, mean input tokens per step): the run's own batches drawn step by step (they are pure functions of
    seed and step) until their input tokens reach the budget; past `limit` steps the rest is extrapolated from
    the mean so far."""
    from objectives.base import input_tokens, make_generator
    from pretrain.batches import BatchPlan

    plan, tc, seq = BatchPlan.of(cfg, 1), cfg.train, cfg.data.seq_len
    split, vocab = prepared.cache.split("train"), prepared.tokenizer.vocab
    tokens, step = 0, 0
    while tokens < budget and step < limit:
        for g in range(plan.micro(step)):
            tokens += input_tokens(cfg.objective.batch(split, vocab, make_generator(tc.seed, "train", step, g, 0),
                                                       tc.batch_size, seq))
        step += 1
    mean = tokens / step
    if tokens >= budget or not math.isfinite(budget):
        return step, mean
    return step + math.ceil((budget - tokens) / mean), mean


def plan_runs(items: list[tuple[str, Any]], prepared: Any, budget: tuple[str, float], seeds: int,
              out: Path) -> list[Planned]:
    """Every (entry, seed) run with its steps for the budget (module docstring)."""
    kind, amount = budget
    runs = []
    for label, cfg in items:
        for k in range(seeds):
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k))
            flops = flops_per_step(c, prepared)
            if kind == "tokens":
                steps, tok = steps_for_tokens(c, prepared, amount)
            else:  # the FLOPs fix the steps; their input tokens are measured for the table
                steps = max(1, math.ceil(amount / flops))
                tok = steps_for_tokens(c, prepared, math.inf, min(steps, 64))[1]
            tc = dataclasses.replace(c.train, max_steps=steps, max_tokens=0, max_time="",
                                     warmup_steps=c.train.warmup_steps if c.train.warmup_steps <= steps // 5
                                     else max(1, steps // 10))
            runs.append(Planned(label, tc.seed, dataclasses.replace(c, train=tc),
                                out / "runs" / f"{label}-seed{tc.seed}", tok, flops))
    return runs


def plan_table(runs: list[Planned]) -> list[tuple]:
    """Rows of the plan printed before training."""
    return [(r.label, r.cfg.recipe or "-", r.seed, r.cfg.train.max_steps, r.cfg.train.warmup_steps,
             f"{r.tokens_per_step:,.0f}", f"{r.tokens_per_step * r.cfg.train.max_steps:,.0f}",
             f"{r.flops_per_step * r.cfg.train.max_steps:.3g}") for r in runs]


def _state(r: Planned) -> str:
    """new, resume or done for a planned run's folder; a UserError when it holds another run."""
    from pretrain import checkpoint
    from pretrain.run import RunDir

    run = RunDir(r.run_dir)
    if not run.holds_run():
        return "new"
    saved = json.loads(run.config.read_text())
    saved.pop("sources", None)
    saved.pop("notes", None)
    if saved != r.cfg.to_dict():
        raise UserError(f"{r.run_dir} holds a run with other settings than this comparison's; choose another --out "
                        "or remove that folder")
    if run.summary.is_file():
        return "done"
    return "resume" if checkpoint.list_checkpoints(run.checkpoints) else "new"


def execute(runs: list[Planned], eval_batches: int, probe_cfg: Any, console: Any) -> None:
    """Train (or resume, or keep), evaluate and probe every planned run, saying which of how many it is at."""
    from pretrain.cli_runs import evaluate_run
    from pretrain.probe import probe_run
    from pretrain.run import RunDir
    from pretrain.trainer import Start, train

    for i, r in enumerate(runs, 1):
        state = _state(r)
        console.rule(f"run {i}/{len(runs)}: {r.label} ({r.cfg.recipe or '-'}), seed {r.seed}, "
                     f"{r.cfg.train.max_steps} steps ({state})")
        if state != "done":
            train(r.cfg, r.run_dir, Start(resume=state == "resume"), console=console)
        run = RunDir(r.run_dir)
        if not run.eval.is_file():
            evaluate_run(r.run_dir, None, "valid", eval_batches, None, [])
        if probe_cfg is not None:
            old = json.loads(run.probe_for(probe_cfg.name).read_text()) if run.probe_for(probe_cfg.name).is_file() \
                else {}
            if old.get("settings") != dataclasses.asdict(probe_cfg):
                console.print(f"probing run {i}/{len(runs)} ({r.label}, seed {r.seed})", markup=False)
                probe_run(r.run_dir, probe_cfg, console)


def _pm(values: list[float], scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    """'mean ± std' of the values ('-' for none; no ± for one)."""
    v = [x * scale for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return "-"
    mean = f"{np.mean(v):.{digits}g}{unit}"
    return mean if len(v) == 1 else f"{mean} ± {np.std(v, ddof=1):.2g}{unit}"


def _probe_cell(probes: list[dict], who: str, how: str, key: str = "acc") -> str:
    """A probe figure over the runs: mean ± std over the runs' means (one run: over its probe seeds)."""
    from pretrain.report import pm

    got = [p[who][how] for p in probes if who in p]
    if not got:
        return "-"
    return pm(got[0], key) if len(got) == 1 else _pp([g[key] for g in got])


def _pp(values: list[float]) -> str:
    return _pm(values, 100.0, "%", 3)


def comparison(runs: list[Planned], task: str | None) -> list[dict[str, str]]:
    """One row per entry: what its runs trained and measured (module docstring)."""
    from pretrain.metrics import fmt
    from pretrain.runlist import format_count, read_run

    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        mine = [r for r in runs if r.label == label]
        infos = [read_run(r.run_dir) for r in mine]
        evals = [i.evals.get("eval.json", {}) for i in infos]
        obj = mine[0].cfg.objective
        main = next(iter(obj.loss_terms))
        acc = main.removesuffix("loss") + "acc"
        probes = [i.probes[task] for i in infos if task in i.probes] if task else []
        rows.append({
            "entry": label, "objective": obj.name, "recipe": mine[0].cfg.recipe or "-", "model": obj.arch.kind,
            "runs": str(len(mine)), "steps": fmt(int(np.mean([i.steps for i in infos]))),
            "input tokens": format_count(int(np.mean([i.tokens for i in infos]))),
            "train FLOPs": f"{np.mean([r.flops_per_step * i.steps for r, i in zip(mine, infos, strict=True)]):.3g}",
            "valid loss": f"{main} {_pm([e.get('loss', math.nan) for e in evals])}",
            "valid accuracy": _pp([e.get(acc, math.nan) for e in evals]) if acc in evals[0] else "-",
            "bits/byte": _pm([e.get("bits_per_byte", math.nan) for e in evals]) if obj.scores_whole_text else "-",
            "probe linear": _probe_cell(probes, "run", "linear"), "probe fine-tuned": _probe_cell(probes, "run",
                                                                                                "finetune"),
            "fine-tuned macro-F1": _probe_cell(probes, "run", "finetune", "macro_f1"),
            "random init fine-tuned": _probe_cell(probes, "random_init", "finetune"),
            "majority": _pp([p["majority"]["acc"] for p in probes[:1]]) if probes else "-"})
    return rows


NOTE = ("Every run: the same tokenizer and token cache, the same budget ({budget}), the same fixed-seed validation "
        "batches. Bits per byte only where an objective scores every token of the text (elsewhere it is per byte of "
        "its hidden targets and does not compare); valid loss and accuracy are each objective's own main term. "
        "Probe: {task}, accuracy on its test split (mean ± standard deviation over {spread}).")


def write(runs: list[Planned], out: Path, budget: tuple[str, float], task: str | None) -> Any:
    """compare.json and the report (comparison table first) in OUT/report; returns the report."""
    from pretrain.report import write_report
    from pretrain.run import write_json

    rows = comparison(runs, task)
    spread = "the runs' seeds" if len({r.seed for r in runs}) > 1 else "the probe's seeds"
    note = NOTE.format(budget=f"{budget[1]:.3g} {'input tokens' if budget[0] == 'tokens' else 'training FLOPs'}",
                       task=task or "not run", spread=spread)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"budget": {budget[0]: budget[1]}, "rows": rows, "note": note, "runs": [
        {"entry": r.label, "seed": r.seed, "run_dir": str(r.run_dir), "steps": r.cfg.train.max_steps,
         "tokens_per_step": r.tokens_per_step, "flops_per_step": r.flops_per_step} for r in runs]})
    return write_report([r.run_dir for r in runs], out / "report", (("Comparison", rows, note),))
