"""`pretrain probe RUN_DIR` (pretrain/probe.py) and `pretrain compare` (pretrain/compare.py): which objective to
pretrain with, measured downstream and at an equal budget. Plain functions; pretrain/cli.py registers them. torch is
imported only inside them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pretrain.cli_common import DataOpt, console
from pretrain.errors import UserError

ProbeSetOpt = Annotated[list[str] | None, typer.Option("--set", help="A probe setting probe.KEY=VALUE (repeatable), "
                                                       "e.g. --set probe.steps=200 --set probe.pooling=mean.")]
CompareSetOpt = Annotated[list[str] | None, typer.Option("--set", help="data.*, train.* or model.* for every run, "
                                                         "probe.* for the probe (repeatable), e.g. --set "
                                                         "train.precision=fp32.")]


def _probe_sets(sets: list[str]) -> tuple[list[str], list[str]]:
    """(probe.* items, the others) of --set."""
    probe = [s for s in sets if s.strip().startswith("probe.")]
    return probe, [s for s in sets if s not in probe]


def _split_names(text: str | None, flag: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if text is not None and not names:
        raise UserError(f"{flag} is empty; give names separated by commas, e.g. {flag} clm,mlm")
    return names


def probe(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pretrain run`.")],
    task: Annotated[str | None, typer.Option("--task", help="A built-in task (stdlib-packages: docstrings by "
                                             "standard-library package, split by module).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="A labeled .jsonl or .parquet file instead (its fields: "
                                             "--set probe.text_field=F --set probe.label_field=F).")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds of the head and batch order (probe.seeds).")]
    = None,
    sets: ProbeSetOpt = None,
) -> None:
    """Fine-tune the run's model with a small classification head (frozen linear probe and full fine-tuning) on a
    labeled task; print accuracy and macro-F1 beside the majority class and the random-init control."""
    from pretrain.probe import probe_config, probe_run

    if task is not None and data is not None:
        raise UserError("give --task NAME or --data FILE, not both")
    probe_items, other = _probe_sets(sets or [])
    if other:
        raise UserError(f"--set {other[0]}: the probe takes probe.KEY=VALUE settings (e.g. --set probe.steps=200)")
    pc = probe_config(probe_items, task=task, data=data, seeds=seeds)
    res = probe_run(run_dir, pc, console)
    _show_probe(run_dir, res)


def _show_probe(run_dir: Path, res: dict) -> None:
    from pretrain.metrics import table
    from pretrain.report import pm

    rows = [("majority class", f"{100 * res['majority']['acc']:.1f}%", f"{100 * res['majority']['macro_f1']:.1f}%")]
    for who, name in (("run", "this run"), ("random_init", "random init (control)")):
        for how in ("linear", "finetune"):
            if who in res:
                f = res[who][how]
                what = "linear probe" if how == "linear" else "fine-tuned"
                rows.append((f"{name}, {what}", pm(f), pm(f, "macro_f1")))
    console.print(table(f"probe of {run_dir} on {res['task']} ({res['n_train']} train / {res['n_test']} test, "
                        f"{len(res['classes'])} classes; mean ± std over {len(res['run']['linear']['seeds'])} seeds)",
                        rows, ("model", "accuracy", "macro-F1")))
    from pretrain.run import RunDir

    console.print(f"wrote {RunDir(run_dir).probe_for(res['task'])}", highlight=False, soft_wrap=True)


def compare(
    objectives: Annotated[str | None, typer.Option("--objectives", help="Objectives to compare, each with its default "
                                                   "recipe, e.g. clm,mlm,span,denoise.")] = None,
    recipes: Annotated[str | None, typer.Option("--recipes", help="Recipes (names or .toml files) instead, e.g. "
                                                "bert-tiny,roberta-tiny.")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Budget: input tokens per run (default 1,000,000).")]
    = None,
    flops: Annotated[float | None, typer.Option("--flops", help="Budget: training FLOPs per run instead, e.g. 3e14.")]
    = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Runs per entry (train.seed, +1, ...).")] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the runs, compare.json and the report "
                                             "(default runs/compare-TIME; the same folder again continues).")] = None,
    data: DataOpt = None,
    sets: CompareSetOpt = None,
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="Fixed-seed validation batches per run.")] = 50,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Skip the downstream probe.")] = False,
) -> None:
    """Train each objective (or recipe) on one tokenizer and one cache at an equal budget, evaluate and probe every
    run, and write a report with the comparison table."""
    import time

    from pretrain import compare as cmp
    from pretrain.metrics import table
    from pretrain.probe import probe_config

    if tokens is not None and flops is not None:
        raise UserError("give --tokens N or --flops F, not both")
    try:
        import matplotlib  # noqa: F401  (the report draws with it: fail before any training)
    except ImportError:
        raise UserError('pretrain compare writes a report drawn with matplotlib: pip install matplotlib (or pip '
                        'install -e ".[report]")') from None
    if (tokens is not None and tokens < 1) or (flops is not None and not flops > 0) or seeds < 1 or eval_batches < 1:
        raise UserError("--tokens, --flops, --seeds and --eval-batches must be positive")
    budget = ("flops", float(flops)) if flops is not None else ("tokens", float(tokens or 1_000_000))
    probe_items, run_sets = _probe_sets(sets or [])
    pc = None if no_probe else probe_config(probe_items)
    items = cmp.entries(_split_names(objectives, "--objectives"), _split_names(recipes, "--recipes"), data, run_sets)
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    items, prepared = cmp.shared_data(items, run_sets, console)
    runs = cmp.plan_runs(items, prepared, budget, seeds, out)
    console.print(table(f"compare: {len(runs)} runs into {out}, one tokenizer ({prepared.tokenizer.path.name}) and "
                        f"one cache ({prepared.cache.path.name})", cmp.plan_table(runs),
                        ("entry", "recipe", "seed", "steps", "warmup", "input tokens/step", "input tokens", "FLOPs")))
    cmp.execute(runs, eval_batches, pc, console)
    rep = cmp.write(runs, out, budget, pc.name if pc else None)
    cols = ("entry", "input tokens", "valid loss", "bits/byte", "probe linear", "probe fine-tuned",
            "random init fine-tuned")
    console.print(table("comparison (the full table is in the report)", [tuple(r[c] for c in cols) for r in rep_rows(
        out)], cols))
    console.print(f"wrote {out / 'compare.json'} and {rep.html}", highlight=False, soft_wrap=True)


def rep_rows(out: Path) -> list[dict]:
    """The comparison rows compare.json holds."""
    import json

    return json.loads((out / "compare.json").read_text())["rows"]
