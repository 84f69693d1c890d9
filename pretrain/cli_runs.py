"""The commands that read run folders: `pretrain runs [DIR]` lists them, `pretrain report RUN_DIR...` compares them,
and the work of `pretrain eval` (`evaluate_run`). Plain functions; pretrain/cli.py registers them on the app.
torch and matplotlib are imported only inside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pretrain.errors import UserError

console = Console()


def evaluate_run(run_dir: Path, data: str | None, split: str, batches: int, out: Path | None,
                 sets: list[str]) -> tuple[dict[str, Any], str, Path]:
    """`pretrain eval`: evaluate the run's newest checkpoint on its own data or `data`, with `--set` overrides of
    data.* / train.* keys; write the results where `runlist.eval_target` says. Returns (results, title, path)."""
    import dataclasses

    from pretrain.config import override
    from pretrain.data import prepare
    from pretrain.evaluate import evaluate
    from pretrain.run import RunDir, load, write_json
    from pretrain.runlist import eval_target
    from pretrain.runtime import setup_runtime

    if split not in ("valid", "train"):
        raise UserError(f"--split must be 'valid' or 'train', got '{split}'")
    if batches < 1:
        raise UserError(f"--batches must be >= 1, got {batches}")
    cfg, _, model, path = load(run_dir)
    run, own = RunDir(run_dir), cfg.data.source
    cfg = override(cfg, ([f"data.source={data}"] if data is not None else []) + sets)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(run.tokenizer)))
    if cfg.objective.positions_needed(cfg.data.seq_len) > cfg.model.max_len:
        raise UserError(f"data.seq_len {cfg.data.seq_len} is longer than the run's model.max_len {cfg.model.max_len}")
    target = eval_target(run, cfg.data.source, own, split, out)  # a bad --out fails before any work
    prepared = prepare(cfg.data, extra_pieces=cfg.objective.special_pieces, progress=True, console=console)
    res = evaluate(model, cfg, prepared.cache.split(split), prepared.tokenizer.vocab, setup_runtime(cfg.train),
                   batches)
    res = {"checkpoint": path.name, "split": split, "data": cfg.data.source or "built-in corpus", **res}
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, res)
    return res, f"eval of {run_dir} ({cfg.objective.name}, {path.name}, {split})", target


def runs(
    root: Annotated[Path | None, typer.Argument(help="The folder holding the runs (default: runs).")] = None,
) -> None:
    """List the runs in a folder: objective, state (running, finished, stopped, crashed), steps, tokens and the
    last validation."""
    from rich import box
    from rich.table import Table

    from pretrain.metrics import fmt
    from pretrain.runlist import format_count, list_runs

    if root is None and not Path("runs").is_dir():
        console.print("no runs yet (there is no runs/ folder here); start one with `make run` or `pretrain run`")
        return
    root = root or Path("runs")
    infos = list_runs(root)
    if not infos:
        console.print(f"no runs in {root}")
        return
    t = Table(title=f"runs in {root} (compare them: pretrain report {root}/*)", title_justify="left",
              box=box.SIMPLE_HEAD)
    t.add_column("run", no_wrap=True)
    for c in ("objective", "state", "steps", "tokens", "last valid loss", "bits/byte"):
        t.add_column(c, justify="left" if c in ("objective", "state") else "right", no_wrap=c == "state")
    for i in infos:
        v = i.valid[-1] if i.valid else {}
        t.add_row(i.run.path.name, i.objective, i.state, fmt(i.steps), format_count(i.tokens),
                  fmt(v["loss"]) if v else "-", fmt(v["bits_per_byte"]) if "bits_per_byte" in v else "-")
    console.print(t)


def report(
    run_dirs: Annotated[list[Path] | None, typer.Argument(help="Run folders written by `pretrain run`, e.g. "
                                                          "runs/*.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html, report.md and the PNG plots.")]
    = Path("report"),
) -> None:
    """Compare runs: PNG plots of training and validation loss, learning rate and throughput against tokens, and a
    table of each run's figures, in report.html and report.md."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError('pretrain report draws with matplotlib: pip install matplotlib (or pip install -e ".[report]")'
                        ) from None
    from pretrain.metrics import table
    from pretrain.report import write_report

    rep = write_report(list(run_dirs or []), out)
    cols = ("run", "objective", "state", "tokens", "valid loss", "bits/byte", "reference")
    console.print(table("report (the full table is in the files)", [tuple(r[c] for c in cols) for r in rep.rows],
                        cols))
    console.print(f"wrote {rep.html} (open it in a browser), {rep.markdown} and "
                  f"{', '.join(p.name for p in rep.plots)}", highlight=False, soft_wrap=True)
