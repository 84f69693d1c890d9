"""What every `pretrain` command module shares: the Typer app, the consoles, the common options, the one way a
user error leaves (one line, exit 2), and config resolution from flags. Imports nothing heavy."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pretrain.errors import UserError, os_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Pretrain Transformer language models with the classic self-supervised objectives.")
tokenizer_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Train a sentencepiece tokenizer.")
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
