"""`pretrain report RUN_DIR...`: one comparison of runs, as PNG plots and a table in Markdown and HTML (the plots
shown in both), tables first as in nanochat's report (karpathy/nanochat `nanochat/report.py`, `Report.generate`).

Per run: objective, recipe, state, parameters, steps, tokens, training time, tokens/s, MFU, validation loss, bits
per byte and the objective's own metrics (from `pretrain eval`'s eval.json when there is one, else the last
validation of training), and the reference figure its summary holds (the objective's baseline). A run still
training, stopped or crashed is reported as far as its records go. Plots (pretrain/plots.py): training and
validation loss, learning rate, and throughput, all against input tokens.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.metrics import fmt
from pretrain.plots import Curve, Panel, draw
from pretrain.runlist import GENERIC, RunInfo, format_count, read_run

PLOTS = {"loss.png": "training and validation loss", "lr.png": "learning rate",
         "throughput.png": "throughput and MFU"}
COLUMNS = ("run", "objective", "recipe", "state", "parameters", "steps", "tokens", "train time", "tokens/s", "MFU",
           "valid loss", "bits/byte", "objective metrics", "valid from", "reference", "probe")


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote: the HTML and Markdown files, the plots, and the table's rows."""

    html: Path
    markdown: Path
    plots: list[Path]
    rows: list[dict[str, str]]


def duration(seconds: float) -> str:
    """243.5 -> '4m 04s'; 37.21 -> '37.2 s'."""
    if not math.isfinite(seconds) or seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.3g} s"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h {m % 60:02d}m" if m >= 60 else f"{m}m {s:02d}s"


def _named(values: dict[str, Any], prefix: str = "") -> str:
    """{'unigram_bits_per_byte': 2.36} -> 'unigram bits per byte 2.36'."""
    return ", ".join(f"{k[len(prefix):].replace('_', ' ')} {fmt(v)}" for k, v in values.items()
                     if k.startswith(prefix)) or "-"


def validation(info: RunInfo) -> tuple[dict, str]:
    """The run's validation figures and where they come from: eval.json (`pretrain eval` on its own data) when
    present, else the last validation of training; ({}, "-") when there is neither."""
    own = info.evals.get(info.run.eval.name)
    if own and own.get("split") == "valid":
        return own, f"eval.json ({own.get('checkpoint', '?')})"
    if info.valid:
        return info.valid[-1], f"step {info.valid[-1]['step']}"
    return {}, "-"


def row(info: RunInfo) -> dict[str, str]:
    """The table's cells for one run (strings, formatted as people read them)."""
    val, source = validation(info)
    s, recs = info.summary, info.train
    tok_s = s.get("tokens_per_s") or (info.tokens / info.seconds if info.seconds > 0 else math.nan)
    mfu = s.get("mfu") if "mfu" in s else (sum(r["mfu"] for r in recs) / len(recs) if recs else math.nan)
    terms = {k: v for k, v in val.items() if k not in GENERIC and isinstance(v, (int, float))}
    return {"run": info.run.path.name, "objective": info.objective, "recipe": info.recipe, "state": info.state,
            "parameters": format_count(info.params), "steps": fmt(info.steps), "tokens": format_count(info.tokens),
            "train time": duration(info.seconds), "tokens/s": fmt(tok_s),
            "MFU": f"{100 * mfu:.3g}%" if isinstance(mfu, float) and math.isfinite(mfu) else "-",
            "valid loss": fmt(val["loss"]) if "loss" in val else "-",
            "bits/byte": fmt(val["bits_per_byte"]) if "bits_per_byte" in val else "-",
            "objective metrics": _named(terms), "valid from": source, "reference": _named(s, "baseline_"),
            "probe": "; ".join(probe_text(task, res) for task, res in info.probes.items()) or "-"}


def pm(figures: dict, key: str = "acc") -> str:
    """'41.2% ± 1.3' from a probe's {acc, acc_std, seeds, ...} figures: the mean and standard deviation over its
    seeds ('41.2%' for one seed, '-' when absent)."""
    if key not in figures:
        return "-"
    if len(figures.get("seeds", ())) < 2:
        return f"{100 * figures[key]:.1f}%"
    return f"{100 * figures[key]:.1f}% ± {100 * figures.get(f'{key}_std', 0.0):.1f}"


def probe_text(task: str, res: dict) -> str:
    """One probe result in a cell: accuracy of the linear probe and of fine-tuning (mean ± std over seeds), the
    random-init control's fine-tuning and the majority class."""
    run, ctrl = res.get("run", {}), res.get("random_init", {})
    parts = [f"{task}: linear {pm(run.get('linear', {}))}, fine-tuned {pm(run.get('finetune', {}))}"]
    if ctrl:
        parts.append(f"random init {pm(ctrl.get('finetune', {}))}")
    parts.append(f"majority {100 * res.get('majority', {}).get('acc', math.nan):.1f}%")
    return ", ".join(parts)


def _curves(infos: list[RunInfo], key, records) -> list[Curve]:
    """One curve per run: (tokens, key(record)) over `records(info)`, skipping records without the value."""
    out = []
    for i, info in enumerate(infos):
        c = Curve(info.run.path.name, i)
        for r in records(info):
            y = key(info, r)
            if isinstance(y, (int, float)) and math.isfinite(y):
                c.xs.append(r["tokens"])
                c.ys.append(y)
        out.append(c)
    return out


def plot_runs(infos: list[RunInfo], mains: list[str], out: Path) -> list[Path]:
    """The three PNGs of PLOTS in `out`; `mains[i]` is run i's main loss term (the key of its training loss)."""
    main = {id(info): m for info, m in zip(infos, mains, strict=True)}

    def get(name):
        return lambda info, r: r.get(name)

    train, valid = (lambda info: info.train), (lambda info: info.valid)
    loss = [Panel("training loss (main term, nats)", "loss", _curves(infos, lambda i, r: r.get(main[id(i)]), train)),
            Panel("validation loss (nats)", "loss", _curves(infos, get("loss"), valid), markers=True)]
    lr = [Panel("learning rate", "lr", _curves(infos, get("lr"), train)),
          Panel("gradient norm (before clipping)", "grad norm", _curves(infos, get("grad_norm"), train), log_y=True)]
    speed = [Panel("throughput", "input tokens / s", _curves(infos, get("tokens_per_s"), train)),
             Panel("model FLOPs utilization", "MFU", _curves(infos, get("mfu"), train), percent=True)]
    return [draw(out / name, panels) for name, panels in zip(PLOTS, (loss, lr, speed), strict=True)]


def _eval_rows(infos: list[RunInfo]) -> list[dict[str, str]]:
    """Every `pretrain eval` result of the runs: one row per file."""
    return [{"run": info.run.path.name, "file": name, "data": str(res.get("data", "-")),
             "split": str(res.get("split", "-")), "checkpoint": str(res.get("checkpoint", "-")),
             "loss": fmt(res["loss"]) if "loss" in res else "-",
             "bits/byte": fmt(res["bits_per_byte"]) if "bits_per_byte" in res else "-"}
            for info in infos for name, res in info.evals.items()]


Section = tuple[str, list[dict[str, str]], str]
"""A table put before the runs' table: (title, rows, a note under it)."""


def markdown(rows: list[dict[str, str]], evals: list[dict[str, str]], plots: list[Path],
             sections: tuple[Section, ...] = ()) -> str:
    """The report as Markdown: the extra sections (`pretrain compare`'s table), the runs' table, the evaluations,
    then the plots."""
    def table(rs: list[dict[str, str]]) -> list[str]:
        cols = list(rs[0])
        esc = [[v.replace("|", "\\|") for v in r.values()] for r in rs]
        return [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}", *(f"| {' | '.join(r)} |" for r in esc), ""]

    lines = ["# pretrain report", ""]
    for title, rs, note in sections:
        lines += [f"## {title}", "", *table(rs), *([note, ""] if note else [])]
    lines += [*(["## Runs", ""] if sections else []), *table(rows)]
    if evals:
        lines += ["## Evaluations (`pretrain eval`)", "", *table(evals)]
    lines += [f"![{PLOTS[p.name]}]({p.name})\n" for p in plots]
    return "\n".join(lines)


def to_html(rows: list[dict[str, str]], evals: list[dict[str, str]], plots: list[Path],
            sections: tuple[Section, ...] = ()) -> str:
    """The report as one HTML page: the same tables, the plots as images beside the file."""
    def table(rs: list[dict[str, str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rs[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rs)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:13px} "
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child{text-align:left} "
             "img{display:block;max-width:100%;margin:1em 0}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pretrain report</title><style>{style}"
             "</style></head><body><h1>pretrain report</h1>"]
    for title, rs, note in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", table(rs)] + ([f"<p>{html.escape(note)}</p>"] if note else [])
    parts += (["<h2>Runs</h2>"] if sections else []) + [table(rows)]
    if evals:
        parts += ["<h2>Evaluations (<code>pretrain eval</code>)</h2>", table(evals)]
    parts += [f"<h2>{html.escape(PLOTS[p.name])}</h2><img src='{html.escape(p.name)}' "
              f"alt='{html.escape(PLOTS[p.name])}'>" for p in plots]
    return "\n".join(parts + ["</body></html>"])


def write_report(run_dirs: list[Path], out: Path, sections: tuple[Section, ...] = ()) -> Report:
    """Read the runs, draw the plots and write report.md and report.html into `out` (created); `sections` are
    tables put first (`pretrain compare`'s comparison)."""
    from pretrain.run import load_config

    if not run_dirs:
        raise UserError("give one or more run folders, e.g. pretrain report runs/*")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    infos = [read_run(p) for p in run_dirs]
    mains = [next(iter(load_config(info.run.path).objective.loss_terms)) for info in infos]
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_runs(infos, mains, out)
    rows, evals = [row(info) for info in infos], _eval_rows(infos)
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown(rows, evals, plots, sections))
    page.write_text(to_html(rows, evals, plots, sections))
    return Report(page, md, plots, rows)
