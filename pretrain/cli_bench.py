"""`pretrain bench`: our code beside the peer it is compared to, measured in one run (the code is in benchmarks/).

`pretrain bench` alone times batch construction and generation; `pretrain bench batches|generate|prepare` one of
them each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pretrain.cli_common import DataOpt, _friendly, console
from pretrain.errors import UserError

ObjectivesOpt = Annotated[list[str] | None, typer.Option("--objective", "-o", help="Objectives to time (default: "
                                                         "all).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Rows of a batch.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", help="Tokens of a row.")]
SecondsOpt = Annotated[float, typer.Option("--seconds", help="Seconds timing ours, and again the peer, per objective.")]

bench_app = typer.Typer(rich_markup_mode=None,
                        help="Benchmarks, each beside its peer: batch construction, generation, data preparation.")


@bench_app.callback(invoke_without_command=True)
@_friendly
def bench(
    ctx: typer.Context,
    objective: ObjectivesOpt = None,
    batch_size: BatchOpt = 64,
    seq_len: SeqOpt = 512,
    seconds: SecondsOpt = 2.0,
    generate: Annotated[bool, typer.Option("--generate/--no-generate", help="Also time generation with the KV "
                                           "cache against recomputation (256 new tokens).")] = True,
    data: DataOpt = None,
) -> None:
    """Our throughput beside the reference peer's, one thread: batch construction per objective (vs BERT, T5,
    fairseq, nanoGPT per-example code) and KV-cached generation (vs recomputing every step)."""
    if ctx.invoked_subcommand is not None:
        return
    batches(objective, batch_size, seq_len, seconds, data)
    if generate:
        generation()


@bench_app.command("batches")
@_friendly
def batches(
    objective: ObjectivesOpt = None,
    batch_size: BatchOpt = 64,
    seq_len: SeqOpt = 512,
    seconds: SecondsOpt = 2.0,
    data: DataOpt = None,
) -> None:
    """Batch construction per objective beside its per-example reference peer, one thread."""
    from benchmarks.batches import bench_batches

    if batch_size < 1 or seq_len < 8 or seconds <= 0:
        raise UserError(f"need --batch-size >= 1, --seq-len >= 8 and --seconds > 0; got {batch_size}, {seq_len}, "
                        f"{seconds}")
    bench_batches(objective or None, batch_size, seq_len, seconds, data, console)


@bench_app.command("generate")
@_friendly
def generation() -> None:
    """Greedy generation of 256 tokens with the KV cache beside recomputing every step, one thread."""
    from benchmarks.generation import bench_generation, print_generation

    print_generation(bench_generation(), console)


@bench_app.command("prepare")
@_friendly
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Folder for the generated corpus and the caches (outside the "
                                      "repository).")] = Path("bench-data"),
    sizes: Annotated[str, typer.Option("--sizes", help="Corpus sizes to prepare, e.g. 20MB,1GB (the largest is "
                                       "generated).")] = "20MB,1GB",
    workers: Annotated[str, typer.Option("--workers", help="Worker counts to time tokenizing with.")] = "1,2",
    timing_size: Annotated[str, typer.Option("--timing-size", help="Corpus size the worker counts are timed on.")]
    = "200MB",
) -> None:
    """Data-path benchmark: generate a corpus, prepare each size (peak RSS of the process and of its workers),
    time tokenization with each worker count on a trained tokenizer, and time a run's first step."""
    from benchmarks.prepare import run_benchmark

    run_benchmark(out, sizes, workers, timing_size, console)


@bench_app.command("train")
@_friendly
def train(
    family: Annotated[str, typer.Option("--family", help="gpt2 | bert | t5 | bart | all.")] = "all",
    size: Annotated[str, typer.Option("--size", help="tiny (d256 L4, 16 x 128) or small (d512 L6, 8 x 256).")]
    = "tiny",
    precision: Annotated[str, typer.Option("--precision", help="bf16 (autocast) or fp32.")] = "bf16",
    rounds: Annotated[int, typer.Option("--rounds", help="Steps timed on each side, alternating.")] = 20,
    cache_dir: Annotated[str, typer.Option("--cache-dir", help="Token caches of the built-in corpus.")]
    = "data/cache",
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="Ours through torch.compile, as "
                                                "train.compile does (its first step includes the compile).")]
    = False,
) -> None:
    """Our training step beside the transformers model of the same config and weights, alternating step by step
    in one process: tokens/s (all positions and real tokens), the ratio, and MFU against the measured peak."""
    from benchmarks.train import FAMILIES, SIZES, bench_family, print_rows
    from pretrain.export import require_transformers

    families = list(FAMILIES) if family == "all" else [family]
    for name, value, choices in (("--family", family, [*FAMILIES, "all"]), ("--size", size, list(SIZES)),
                                 ("--precision", precision, ["bf16", "fp32"])):
        if value not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if rounds < 2:
        raise UserError(f"--rounds must be >= 2, got {rounds}")
    require_transformers()
    from pretrain.runtime import keep_freed_memory

    keep_freed_memory()  # as the trainer does; the transformers side, in the same process, gains from it too
    print_rows([bench_family(f, size, precision, rounds, cache_dir, compile_model) for f in families], console)
