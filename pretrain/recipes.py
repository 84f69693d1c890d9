"""The recipes in recipes/: TOML files named after what they train (gpt2, bert-tiny, ...), each citing its
paper in its header. Read with the standard library's `tomllib`; validated when a Config is built from them."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from pretrain.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def suggest(word: str, choices: list[str]) -> str:
    """The hint " (did you mean 'X'?)" for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""



def recipe_path(name_or_path: str) -> Path:
    """recipes/NAME.toml for a bare name, else the given path; a UserError listing recipes if missing."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            raise UserError(
                f"recipe file {p} does not exist; give a recipe name ({', '.join(list_recipes())}) or a .toml path"
            )
        return p
    p = RECIPES_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        names = list_recipes()
        raise UserError(
            f"unknown recipe '{name_or_path}'{suggest(name_or_path, names)}; choose one of: {', '.join(names)}"
        )
    return p


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def read_recipe(name_or_path: str) -> dict:
    """The recipe's TOML as a dict (validated later, when the Config is built)."""
    p = recipe_path(name_or_path)
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {p} is not valid TOML: {e}") from None


def recipe_description(name: str) -> str:
    """The recipe's one-line `description`."""
    return str(read_recipe(name).get("description", ""))
