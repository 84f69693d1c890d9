"""What `pretrain prepare` and `pretrain tokenizer train` do once their flags are parsed, and print."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pretrain.errors import UserError


def prepare_command(cfg: Any, extra_pieces: tuple[str, ...], part: str | None, merge: bool, console: Any) -> None:
    """`pretrain prepare [--part I/N | --merge]`: build, continue, merge or reuse, then print the figures.
    `extra_pieces`: the special pieces of the config's objective, which a trained tokenizer gets."""
    from pretrain.metrics import table

    if part is not None:
        from pretrain.prepare import prepare_part

        m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", part)
        if not m:
            raise UserError(f"--part must look like I/N (part I of N, e.g. --part 0/4), got {part!r}")
        stats = prepare_part(cfg, (int(m[1]), int(m[2])), progress=True, console=console)
        console.print(table(f"part {m[1]}/{m[2]} of the token cache", stats))
        console.print(f"when all {m[2]} parts are done: `pretrain prepare --merge` with the same --data and --set "
                      "(or start `pretrain run`, which merges them)")
        return
    if merge:
        from pretrain.prepare import merge_cache as prepare_data
    else:
        from pretrain.data import prepare as prepare_data
    prepared = prepare_data(cfg, extra_pieces=extra_pieces, progress=True, console=console)
    stats = prepared.stats
    splits = [k for k in ("train", "valid") if isinstance(stats.get(k), dict)]
    rows = [(k, *(stats[s].get(k, "") for s in splits), stats.get(k, "")) for k in ("documents", "sentences", "tokens",
                                                                                    "bytes")]
    console.print(table(f"token cache {prepared.cache.path}", rows, ("", *splits, "total")))
    console.print(table("prepare", {k: v for k, v in stats.items() if not isinstance(v, dict) and k not in
                                    ("documents", "sentences", "tokens", "bytes")}))


def tokenizer_command(cfg: Any, extra_pieces: tuple[str, ...], out: Path, size_kind: tuple[int, str],
                      console: Any) -> Path:
    """`pretrain tokenizer train`: sample the stream and train a tokenizer of size_kind = (vocabulary size,
    unigram | bpe) with the objective's `extra_pieces` (the same seed and sample as `prepare` trains with, so
    both give the same model); print what it was trained on."""
    vocab_size, kind = size_kind
    from pretrain.bars import Bars
    from pretrain.prepare import TOKENIZER_SEED, workers_for
    from pretrain.sample import train_for_source
    from pretrain.shards import disk_error
    from pretrain.stream import resolve_source

    source = resolve_source(cfg)
    bars = Bars(True, console)
    task = bars.task("sampling", source.total((0, 1)) if source.kind != "dataset" else None)
    try:
        path, timings = train_for_source(
            source, cfg, Path(out), vocab_size, kind, seed=TOKENIZER_SEED, soft_limit=False, extra_pieces=extra_pieces,
            workers=workers_for(cfg, source, (0, 1)), on_train=lambda: bars.finish(task),
            on_chunk=lambda chunk, docs, nbytes: bars.advance(task, chunk.units, nbytes=nbytes, docs=docs))
    except OSError as e:
        raise disk_error(e, Path(out).parent) from None
    finally:
        bars.close()
    info = timings["sample"]
    console.print(f"wrote {path} (trained on {info['sampled']:,} of {info['sentences']:,} sentences, "
                  f"{info['documents']:,} documents)", markup=False)
    return path
