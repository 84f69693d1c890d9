"""`pretrain generate` and `pretrain fill-mask`: let a trained model speak (the work is in pretrain/generate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pretrain.cli_common import console, err_console
from pretrain.errors import UserError

ModeOpt = Annotated[str | None, typer.Option("--mode", help="A mode token the run was trained with (UL2's [NLU], "
                                             "[NLG], [S2S]), put first in the prompt as in training.")]


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
    mode: ModeOpt = None,
) -> None:
    """Write text with a trained model: greedy by default, sampling, or beam search; KV-cached."""
    import random

    import torch

    from pretrain.generate import DecodeOptions, encode_prompts, load_run, mode_note, show_batched, show_stream

    if (prompt is None) == (prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompts is not None and (not prompts.exists() or prompts.is_dir()):
        raise UserError(f"--prompts {prompts} is not a file; give a text file with one prompt per line")
    texts = [prompt] if prompt is not None else [ln for ln in prompts.read_text().splitlines() if ln.strip()]
    if not texts:
        raise UserError(f"{prompts} holds no prompt; write one per line")
    opts = DecodeOptions(max_new_tokens, beam, length_penalty, sample, temperature, top_k, top_p, seed, min_new_tokens,
                         batch_size)
    r = load_run(run_dir, mode=mode)
    encode_prompts(r, texts)  # refuse a bad run or prompt before printing anything
    gen = None
    if opts.sampling:
        seed = seed if seed is not None else random.randrange(2**31)
        gen = torch.Generator().manual_seed(seed)
    notes: list[str] = [n] if (n := mode_note(r, mode)) else []
    if len(texts) == 1 and opts.beam == 1:  # stream the one prompt's tokens as they come
        show_stream(console, r, texts[0], opts, gen, notes)
    else:
        show_batched(console, r, texts, opts, gen, notes)
    for note in dict.fromkeys(notes):
        err_console.print(f"note: {note}", markup=False)
    if gen is not None:
        err_console.print(f"note: sampled with --seed {seed}")


def fill_mask(
    run_dir: Annotated[Path, typer.Argument(help="A masked-LM run folder written by `pretrain run`.")],
    text: Annotated[str, typer.Argument(help="Text with one or more [MASK] to predict.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Candidates shown per mask.")] = 5,
    mode: ModeOpt = None,
) -> None:
    """Predict each [MASK] of a text with a masked-LM run: a table of the top-k candidates."""
    from rich.table import Table
    from rich.text import Text

    from pretrain.generate import fill_mask as predict
    from pretrain.generate import load_run, mode_note, top1_text

    if "[MASK]" not in text:
        raise UserError("the text has no [MASK]; write [MASK] where a token should be predicted")
    r = load_run(run_dir, mode=mode)
    if note := mode_note(r, mode):
        err_console.print(f"note: {note}", markup=False)
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
