"""The `pretrain` command line (Typer). Each command parses flags into a Config and calls one function.

torch, datasets, sentencepiece, matplotlib and tensorboard are imported inside the commands, so `pretrain --help`
answers at once. Flags mean the same in every command: --data PATH|NAME, --out (where the command writes: the run
folder, the cache folder, the eval JSON, the report folder), --recipe NAME|PATH and --set key=value (repeatable)
wherever a command reads a config, --seed N. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from pretrain import cli_runs
from pretrain.errors import UserError, os_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pretrain Transformer language models with the classic self-supervised objectives.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a sentencepiece tokenizer.")
app.add_typer(tokenizer_app, name="tokenizer")
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

DataOpt = Annotated[str | None, typer.Option("--data", help="Text files/folder/glob or a datasets name (default: "
                                              "the built-in Python-docstrings corpus).")]
RecipeOpt = Annotated[str | None, typer.Option("--recipe", help="Recipe name (see `pretrain recipes`) or .toml path.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: section.key=value "
                                                   "(repeatable), e.g. --set train.lr=3e-4.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of weights, dropout and batches (train.seed).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]


def _friendly(fn):
    """Turn a UserError, or a file-system error (a full disk, a read-only folder, a file where a folder should
    be), into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as e:
            print_error(e if isinstance(e, UserError) else os_error(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def print_error(e: UserError) -> None:
    """The one printer of user errors: `error: ` then the message as written (markup escaped), one line; under
    torchrun only rank 0 prints (every rank meets the same error)."""
    from rich.markup import escape

    if _is_main_rank():
        err_console.print(f"[bold red]error:[/] {escape(' '.join(str(e).split()))}")


def _resolve(recipe: str | None, objective: str | None, data: str | None, seed: int | None, sets: list[str] | None,
             **flags: Any):
    from pretrain.config import resolve

    named = {"data.source": data, "train.seed": seed, **flags}
    return resolve(recipe=recipe, objective=objective, flags=named, sets=sets or [])


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 prints (and writes); a plain run is rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def _print_config(cfg: Any, sources: list) -> None:
    from pretrain.metrics import table

    rows = [(k, json.dumps(v) if isinstance(v, (list, dict)) else v, src) for k, v, src in sources]
    console.print(table(f"config (defaults < recipe '{cfg.recipe or '-'}' < flags < --set); non-defaults:", rows,
                        ("key", "value", "source")))


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
    from pretrain.config import list_recipes, recipe_description
    from pretrain.metrics import table

    console.print(table("recipes (pretrain run --recipe NAME, or make recipe-NAME)",
                        [(n, recipe_description(n)) for n in list_recipes()], ("recipe", "description")))


@app.command()
@_friendly
def bench(
    objective: Annotated[list[str] | None, typer.Option("--objective", "-o", help="Objectives to time (default: "
                                                        "all).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 512,
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds timing ours, and again the peer, per "
                                           "objective.")] = 2.0,
    generate: Annotated[bool, typer.Option("--generate/--no-generate", help="Also time generation with the KV "
                                           "cache against recomputation (256 new tokens).")] = True,
    data: DataOpt = None,
) -> None:
    """Our throughput beside the reference peer's, one thread: batch construction per objective (vs BERT, T5,
    fairseq, nanoGPT per-example code) and KV-cached generation (vs recomputing every step)."""
    from benchmarks.batches import bench_batches
    from benchmarks.generation import bench_generation, print_generation

    if batch_size < 1 or seq_len < 8 or seconds <= 0:
        raise UserError(f"need --batch-size >= 1, --seq-len >= 8 and --seconds > 0; got {batch_size}, {seq_len}, "
                        f"{seconds}")
    bench_batches(objective or None, batch_size, seq_len, seconds, data, console)
    if generate:
        print_generation(bench_generation(), console)


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


@app.command("bench-prepare")
@_friendly
def bench_prepare(
    out: Annotated[Path, typer.Option("--out", help="Folder for the generated corpus and the caches (outside the "
                                      "repository).")] = Path("bench-data"),
    sizes: Annotated[str, typer.Option("--sizes", help="Corpus sizes to prepare, e.g. 20MB,1GB (the largest is "
                                       "generated).")] = "20MB,1GB",
    workers: Annotated[str, typer.Option("--workers", help="Worker counts to time tokenizing with.")] = "1,2",
    timing_size: Annotated[str, typer.Option("--timing-size", help="Corpus size the worker counts are timed on.")]
    = "200MB",
) -> None:
    """Data-path benchmark: generate a corpus, prepare each size (peak RSS of the process and of its workers),
    and time tokenization with each worker count on a trained tokenizer."""
    from benchmarks.prepare import run_benchmark

    run_benchmark(out, sizes, workers, timing_size, console)


# ---------------------------------------------------------------------------------------------- decoding


@app.command()
@_friendly
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `pretrain run` (decoder or "
                                            "encoder-decoder).")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="The prompt; for span/denoise runs it may hold "
                                               "<extra_id_N> or [MASK] to fill in. \"\" = unconditional.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="A file of prompts, one per line (batched).")]
    = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Most new tokens (default: 100; "
                                                       "encoder-decoders: input length + 50).")] = None,
    beam: Annotated[int, typer.Option("--beam", help="Beam search of this width, e.g. --beam 4 (1 = off).")] = 1,
    length_penalty: Annotated[float, typer.Option("--length-penalty", help="Beam length penalty alpha in "
                                                  "((5+len)/6)^alpha.")] = 0.6,
    sample: Annotated[bool, typer.Option("--sample", help="Ancestral sampling instead of greedy decoding.")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature (implies "
                                                      "--sample; default 1).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample among the K most likely tokens (implies "
                                              "--sample).")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling (implies --sample): the smallest "
                                                "set with probability >= P.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (same seed, same sample).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together.")] = 16,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens", help="No </s> before this many new tokens "
                                                "(keeps beam search from ending at once on a weak model).")] = 0,
) -> None:
    """Write text with a trained model: greedy by default, sampling, or beam search; KV-cached."""
    import random

    import torch

    from pretrain.generate import DecodeOptions, encode_prompts, load_run, show_batched, show_stream

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompts is not None and (not prompts.exists() or prompts.is_dir()):
        raise UserError(f"--prompts {prompts} is not a file; give a text file with one prompt per line")
    texts = [prompt] if prompt is not None else [ln for ln in prompts.read_text().splitlines() if ln.strip()]
    if not texts:
        raise UserError(f"{prompts} holds no prompt; write one per line")
    opts = DecodeOptions(max_new_tokens, beam, length_penalty, sample, temperature, top_k, top_p, seed, min_new_tokens,
                         batch_size)
    r = load_run(run_dir)
    encode_prompts(r, texts)  # refuse a bad run or prompt before printing anything
    gen = None
    if opts.sampling:
        seed = seed if seed is not None else random.randrange(2**31)
        gen = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    if len(texts) == 1 and opts.beam == 1:  # stream the one prompt's tokens as they come
        show_stream(console, r, texts[0], opts, gen, notes)
    else:
        show_batched(console, r, texts, opts, gen, notes)
    for note in dict.fromkeys(notes):
        err_console.print(f"note: {note}", markup=False)
    if gen is not None:
        err_console.print(f"note: sampled with --seed {seed}")


@app.command("fill-mask")
@_friendly
def fill_mask(
    run_dir: Annotated[Path, typer.Argument(help="A masked-LM run folder written by `pretrain run`.")],
    text: Annotated[str, typer.Argument(help="Text with one or more [MASK] to predict.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Candidates shown per mask.")] = 5,
) -> None:
    """Predict each [MASK] of a text with a masked-LM run: a table of the top-k candidates."""
    from rich.table import Table
    from rich.text import Text

    from pretrain.generate import fill_mask as predict
    from pretrain.generate import load_run, top1_text

    if "[MASK]" not in text:
        raise UserError("the text has no [MASK]; write [MASK] where a token should be predicted")
    r = load_run(run_dir)
    cands = predict(r, text, top_k)
    t = Table(title=Text(f"fill-mask with {run_dir}"), title_justify="left")
    for c, justify in (("mask", "right"), ("rank", "right"), ("piece", "left"), ("probability", "right")):
        t.add_column(c, justify=justify)
    for m, row in enumerate(cands, 1):
        for rank, (i, p) in enumerate(row, 1):
            t.add_row(str(m) if rank == 1 else "", str(rank), Text(r.tokenizer.id_to_piece(i)), f"{p:.4f}",
                      end_section=rank == len(row))
    console.print(t)
    console.print("[bold]top-1:[/] ", end="")
    console.print(top1_text(r, text, cands), markup=False, highlight=False)


app.command("runs")(_friendly(cli_runs.runs))
app.command("report")(_friendly(cli_runs.report))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
