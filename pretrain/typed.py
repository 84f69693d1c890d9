"""Config values typed from their dataclass annotations: `coerce` checks a TOML/JSON value or parses a `--set`
string against a field's annotation (Literal, tuple, bool, int, float, str, and tables: an objective, or a
dataclass such as a mixture's component), `build` makes a dataclass from a table and rejects unknown keys,
`to_table` is the inverse (what config.json holds). An unknown key or a wrong type is a `UserError` naming the
key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal

from models.config import ModelConfig
from pretrain.errors import UserError
from pretrain.recipes import suggest

if TYPE_CHECKING:
    from objectives.base import Objective


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (TOML/JSON values) or parse (strings from --set) `value` against the annotation `hint`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = list(typing.get_args(hint))
        if value not in choices:
            raise UserError(
                f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}{suggest(str(value), choices)}"
            )
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip().strip("'\"") for v in value.strip("()[] ").split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[X, ...]: any length
            if _is_table(args[0]):  # a list of tables (a mixture's components): name each by its place
                return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            return tuple(coerce(v, args[0], key) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key} needs {len(args)} values (e.g. {key}=0.9,0.95), got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"config field {key} must not be a union")
    if _is_table(hint):
        return build_table(hint, value, key)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key} must be a string, got {value!r}")
    raise AssertionError(f"unsupported config annotation {hint!r} for {key}")


def build(cls: type, values: dict, section: str) -> Any:
    """Construct dataclass `cls` from `values`, rejecting unknown keys and wrong types. `models/` validates
    with ValueError (it imports nothing from here); that becomes the user's one-line error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for key in values:
        if key not in names:
            raise UserError(
                f"unknown key '{section}.{key}'{suggest(key, names)}; valid keys: {', '.join(names)}"
            )
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    if cls is not ModelConfig:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def _is_objective(hint: Any) -> bool:
    """Whether a field's annotation is an objective (built from a table of `name` and its hyper-parameters)."""
    from objectives.base import Objective

    return isinstance(hint, type) and issubclass(hint, Objective)


def _is_table(hint: Any) -> bool:
    """Whether a field's annotation is a table: an objective, or a dataclass (a mixture's component)."""
    return isinstance(hint, type) and (dataclasses.is_dataclass(hint) or _is_objective(hint))


def build_table(cls: type, value: Any, key: str) -> Any:
    """A table-valued field (a TOML table, or a JSON object from config.json): an objective from `name` and its
    hyper-parameters, or a dataclass whose one objective-typed field takes `name` and every key that is not one
    of the dataclass's own, so that a recipe writes a component flat: name, weight, mode, then the objective's
    keys."""
    if not isinstance(value, dict):
        raise UserError(f"{key} must be a table, got {value!r}; tables are written in a recipe file "
                        f"([[{key.split('[')[0]}]] tables for a list of them), which --set cannot give: pass that file "
                        "with --recipe FILE")
    if _is_objective(cls):
        return build_objective(value, key)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    nested = [n for n in names if _is_objective(hints[n])]
    if not nested:
        return build(cls, value, key)
    own = {k: coerce(v, hints[k], f"{key}.{k}") for k, v in value.items() if k in names and k != nested[0]}
    inner = {k: v for k, v in value.items() if k not in own}
    if "name" not in inner:
        raise UserError(f"{key} names no objective; give it name = one of: {', '.join(_registry())}")
    valid = [n for n in names if n != nested[0]] + [f.name for f in fields(objective_class(str(inner["name"])))
                                                     if f.init]
    for k in inner:
        if k != "name" and k not in valid:
            raise UserError(f"unknown key '{key}.{k}'{suggest(k, valid)}; valid keys: name, {', '.join(valid)}")
    return cls(**own, **{nested[0]: build_objective(inner, key)})


def build_objective(table: dict, key: str = "objective") -> Objective:
    """The objective a table names (`name`, default the default objective, and its hyper-parameters), validated;
    a problem inside a nested table (a mixture's component) names where it is."""
    from objectives import DEFAULT_OBJECTIVE

    rest = dict(table)
    name = rest.pop("name", DEFAULT_OBJECTIVE)
    if key == "objective":
        return build(objective_class(name), rest, key)
    try:
        return build(objective_class(str(name)), rest, key)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def _registry() -> list[str]:
    from objectives import OBJECTIVES

    return sorted(OBJECTIVES)


def to_table(value: Any) -> Any:
    """A config value as JSON-able data, the inverse of `build_table`: an objective as its table (name first), a
    component as one flat table around its objective, tuples as lists."""
    from objectives.base import Objective

    if isinstance(value, Objective):
        return {"name": value.name, **{f.name: to_table(getattr(value, f.name)) for f in fields(value)}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own, inner = {}, {}
        for f in fields(value):
            v = getattr(value, f.name)
            if isinstance(v, Objective):
                inner = to_table(v)
            else:
                own[f.name] = to_table(v)
        return {"name": inner.pop("name"), **own, **inner} if inner else own
    if isinstance(value, (tuple, list)):
        return [to_table(v) for v in value]
    return value


def objective_class(name: str) -> type[Objective]:
    """The registered objective class called `name`; a UserError listing the choices otherwise."""
    from objectives import OBJECTIVES as registry

    if name not in registry:
        choices = sorted(registry)
        raise UserError(
            f"unknown objective '{name}'{suggest(name, choices)}; choose one of: {', '.join(choices)}"
        )
    return registry[name]
