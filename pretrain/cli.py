"""The `pretrain` command line (Typer). Each command parses flags into a Config and calls one function.

torch, datasets, sentencepiece, matplotlib and tensorboard are imported inside the commands, so `pretrain --help`
answers at once. Flags mean the same in every command: --data PATH|NAME, --out (where the command writes: the run
folder, the cache folder, the eval JSON, the report folder), --recipe NAME|PATH and --set key=value (repeatable)
wherever a command reads a config, --seed N. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from pretrain import cli_bench, cli_compare, cli_decode, cli_runs
from pretrain.cli_common import (
    DataOpt,
    OutOpt,
    RecipeOpt,
    SeedOpt,
    SetOpt,
    _friendly,
    _is_main_rank,
    _print_config,
    _resolve,
    app,
    console,
    tokenizer_app,
)
from pretrain.errors import UserError

# ---------------------------------------------------------------------------------------------- run / eval


class _RegistryHelp(TyperCommand):
    """A command whose --objective help lists the registered objectives, read from the registry when the help
    is shown (so `pretrain --help` stays free of torch, which the objectives import)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from objectives import OBJECTIVES

        for p in self.params:
            if p.name == "objective":
                p.help = f"{' | '.join(OBJECTIVES)} (see `pretrain objectives`)."
        super().format_help(ctx, formatter)


@app.command(cls=_RegistryHelp)
@_friendly
def run(
    objective: Annotated[str | None, typer.Option("--objective", "-o", help="A registered objective (see "
                                                  "`pretrain objectives`).")] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    sets: SetOpt = None,
    seed: SeedOpt = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Stop after N input tokens.")] = None,
    max_time: Annotated[str | None, typer.Option("--max-time", help="Stop after this much training time, e.g. 4m, "
                                                 "90s, 1h30m (train.max_time); the schedule fits it.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32 | bf16 | fp16 (train.precision).")]
    = None,
    compile_model: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model "
                                                       "(train.compile).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder from its "
                                                "newest checkpoint.")] = None,
    accept_data_change: Annotated[bool, typer.Option("--accept-data-change", help="With --resume: go on although "
                                                     "the corpus changed (no longer an exact continuation).")] = False,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Start from the weights of a Hugging Face "
                                                  "model (a folder from `pretrain export`, or a hub name); its "
                                                  "config and tokenizer come along.")] = None,
) -> None:
    """Train a model (tokenizer and token cache are made on the fly); `make run` runs the default."""
    import dataclasses

    from pretrain.metrics import table
    from pretrain.run import load_config
    from pretrain.trainer import Start, train

    if accept_data_change and resume is None:
        raise UserError("--accept-data-change only applies to --resume")
    if resume is not None:
        if (objective or recipe or data or sets or seed is not None or out or precision or compile_model is not None
                or init_from):
            raise UserError("--resume continues a run with its own config; only --max-steps/--max-tokens/--max-time "
                            "may change")
        cfg = load_config(resume)  # the checkpoint and the data are checked by `train` before any work
        budget = {k: v for k, v in (("max_steps", max_steps), ("max_tokens", max_tokens), ("max_time", max_time))
                  if v is not None}
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **budget))
        sources, run_dir = [], resume
    else:
        cfg, sources = _resolve(recipe, objective, data, seed, sets, **{
            "train.max_steps": max_steps, "train.max_tokens": max_tokens, "train.max_time": max_time,
            "train.precision": precision, "train.compile": compile_model})
        if init_from is not None:  # the model config and tokenizer come from the Hugging Face folder
            from pretrain.hf_import import init_config

            cfg, sources = init_config(init_from, cfg, sources, explicit=recipe is not None)
        run_dir = out or Path("runs") / f"{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if _is_main_rank():
            _print_config(cfg, sources)
    start = Start(resume=resume is not None, sources=sources, accept_data_change=accept_data_change,
                  init_from=init_from)
    summary = train(cfg, run_dir, start, console=console)
    if _is_main_rank():
        console.print(table(f"run summary ({cfg.objective.name})", summary))


@app.command("eval")
@_friendly
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pretrain run`.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="valid or train split of the data.")] = "valid",
    batches: Annotated[int, typer.Option("--batches", help="Fixed-seed batches to evaluate.")] = 50,
    out: Annotated[Path | None, typer.Option("--out", help="A folder or .json file for the results (default: "
                                             "RUN_DIR/eval.json, on other data RUN_DIR/eval-NAME.json).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override a data.* or train.* key of the run's "
                                                   "config (repeatable), e.g. --set data.cache_dir=DIR.")] = None,
) -> None:
    """Evaluate a run's newest checkpoint; print a table and write its JSON (RUN_DIR/eval.json on its own data)."""
    from pretrain.metrics import table

    res, title, target = cli_runs.evaluate_run(run_dir, data, split, batches, out, sets or [])
    console.print(table(title, res))
    console.print(f"wrote {target}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- data


@app.command()
@_friendly
def prepare(
    data: DataOpt = None,
    recipe: RecipeOpt = None,
    sets: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="The cache folder (data.cache_dir; default data/cache); "
                                             "runs reuse it with --set data.cache_dir=DIR.")] = None,
    part: Annotated[str | None, typer.Option("--part", help="Write part I of N (e.g. --part 0/4) into the cache "
                                             "folder: one job of a cluster array; every part needs the same --set "
                                             "data.tokenizer=...")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Join the finished parts into one cache (a plain prepare "
                                        "or run does it too).")] = False,
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="Use only the first N documents of the stream "
                                                 "(data.max_docs).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Tokenizing processes (data.workers; 0 = all "
                                                "cores).")] = None,
) -> None:
    """Build, continue or reuse the tokenizer and token cache of the data (streamed; parts for a cluster with
    --part I/N, then --merge); print its size and tokenizing speed."""
    from pretrain.datacmd import prepare_command

    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the token cache")
    if part is not None and merge:
        raise UserError("give --part I/N (one job of N) or --merge (after all N jobs), not both")
    cfg, _ = _resolve(recipe, None, data, None, sets, **{"data.cache_dir": None if out is None else str(out),
                                                         "data.max_docs": max_docs, "data.workers": workers})
    prepare_command(cfg.data, cfg.objective.special_pieces, part, merge, console)


@tokenizer_app.command("train")
@_friendly
def tokenizer_train(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Output path prefix (writes PREFIX.model, PREFIX.vocab and "
                                      "PREFIX.json).")] = Path("tokenizer"),
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Pieces, specials and bytes included.")] = 8000,
    kind: Annotated[str, typer.Option("--type", help="unigram or bpe.")] = "unigram",
    recipe: RecipeOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train a sentencepiece tokenizer with the fixed special pieces every objective needs, on a uniform sample
    of at most data.tokenizer_sample sentences of the stream (the one to pass to every `prepare --part`)."""
    from pretrain.datacmd import tokenizer_command

    if kind not in ("unigram", "bpe"):
        raise UserError(f"--type must be 'unigram' or 'bpe', got '{kind}'")
    if Path(f"{out}.model").exists():
        raise UserError(f"{out}.model already exists; choose another --out or delete it")
    cfg, _ = _resolve(recipe, None, data, None, sets)
    tokenizer_command(cfg.data, cfg.objective.special_pieces, out, (vocab_size, kind), console)


# ---------------------------------------------------------------------------------------------- listings


@app.command("objectives")
@_friendly
def objectives_() -> None:
    """List the registered objectives with their hyper-parameters and defaults."""
    from dataclasses import fields

    from rich.table import Table
    from rich.text import Text

    from objectives import OBJECTIVES

    t = Table(title="objectives (pretrain run --objective NAME; --set objective.KEY=VALUE)", title_justify="left",
              show_lines=True)
    for c in ("objective", "arrangement", "what", "hyper-parameters (defaults)"):
        t.add_column(c)
    for name, cls in OBJECTIVES.items():
        obj = cls()  # the defaults; the arrangement may depend on them (mlm with or without NSP)
        what = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        params = "\n".join(f"{f.name} = {getattr(obj, f.name)!r}" for f in fields(obj)) or "-"
        t.add_row(Text(name, style="bold"), obj.arch.kind, Text(what), Text(params))
    console.print(t)


@app.command("recipes")
@_friendly
def recipes_() -> None:
    """List the recipes in recipes/ with their one-line descriptions."""
    from pretrain.metrics import table
    from pretrain.recipes import list_recipes, recipe_description

    console.print(table("recipes (pretrain run --recipe NAME, or make recipe-NAME)",
                        [(n, recipe_description(n)) for n in list_recipes()], ("recipe", "description")))


# ---------------------------------------------------------------------------------------------- export


@app.command("export")
@_friendly
def export_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pretrain run`.")],
    out: Annotated[Path, typer.Option("--out", help="The Hugging Face folder to write (must not exist or be "
                                      "empty).")],
    step: Annotated[int | None, typer.Option("--step", help="Export the checkpoint of step N (default: the "
                                             "newest).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Write the run's model as a Hugging Face transformers folder (weights, config, tokenizer, model card),
    checked to give our logits; needs `pip install 'pretrain[hf]'`."""
    from pretrain.export import export

    card = export(run_dir, out, step, force)
    diff = ", ".join(f"{k} {v:.1e}" for k, v in card["max_abs_diff"].items())
    console.print(f"wrote {out}: {card['family']} from {card['checkpoint']} (max abs difference to ours: {diff}); "
                  f"load it with {card['auto_class']}.from_pretrained(\"{out}\")", markup=False, highlight=False,
                  soft_wrap=True)


app.command("runs")(_friendly(cli_runs.runs))
app.command("report")(_friendly(cli_runs.report))
app.command("generate")(_friendly(cli_decode.generate))
app.command("fill-mask")(_friendly(cli_decode.fill_mask))
app.command("probe")(_friendly(cli_compare.probe))
app.command("compare")(_friendly(cli_compare.compare))
app.add_typer(cli_bench.bench_app, name="bench")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
