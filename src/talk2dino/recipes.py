"""Dataclass configs <-> command-line flags and YAML recipes (house-style §3, §6).

Every field of a config dataclass becomes a flag (``lr`` -> ``--lr``) whose default is None, so the
dataclass stays the single source of defaults; a YAML recipe (``--recipe file.yaml``) sets fields
first, flags override it, and unknown keys are errors, not warnings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from talk2dino.config import check_fields
from talk2dino.errors import InvalidInputError

T = TypeVar("T")
_MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; a bigger file is not one


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parser_for(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(argparse type callable, extra add_argument kwargs) for a field type."""
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        choices = list(get_args(tp))
        return type(choices[0]), {"choices": choices}
    if origin is tuple:
        inner = get_args(tp)[0]
        return (lambda text: tuple(inner(v.strip()) for v in text.split(",") if v.strip())), {"metavar": "A,B,..."}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return tp, {}
    raise TypeError(f"unsupported config field type {tp!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, *, exclude: tuple[str, ...] = (),
                            help_from_comments: bool = True) -> None:
    """Add one ``--field-name`` flag per dataclass field (default None)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls) if help_from_comments else {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        conv, extra = _parser_for(hints[f.name])
        default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": comments.get(f.name, "") + default}
        if conv is not None:
            kwargs["type"] = conv
        kwargs.update(extra)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the class source: the flag's help text."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"')):
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = stripped.split("#", 1)[1].strip()
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) recipe into a flat dict.

    Only plain YAML is read (``yaml.safe_load``: no Python tags, so a recipe can never build objects).

    Raises:
        InvalidInputError: (a ``ValueError``) unreadable file, not YAML, too large, or not a mapping
            with string keys; one line naming the file.
    """
    import yaml

    try:
        if Path(path).stat().st_size > _MAX_RECIPE_BYTES:
            raise InvalidInputError(f"{path}: too large for a recipe (over {_MAX_RECIPE_BYTES} bytes)")
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except InvalidInputError:
        raise
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as err:
        # ValueError covers undecodable UTF-8; RecursionError, absurdly nested YAML.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[:2])[:300] or type(err).__name__
        raise InvalidInputError(f"{path}: cannot read recipe ({detail})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a recipe must be a mapping of field: value, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"{path}: recipe keys must be field names, got {str(bad[0])[:60]!r}")
    return data


def build_config(cls: type[T], args: argparse.Namespace | None = None, *, recipe: dict[str, Any] | None = None,
                 **fixed: Any) -> T:
    """Recipe values, then `fixed`, then non-None flags -> a validated dataclass instance.

    Raises:
        InvalidInputError: (a ``ValueError``) unknown keys or values of a wrong type in the recipe, or a
            missing required field.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if recipe:
        unknown = sorted(str(k) for k in recipe if k not in names)
        if unknown:
            raise InvalidInputError(f"unknown {cls.__name__} keys in recipe: {unknown[:10]}")
        # Recipes are files: check every value's type here, so a wrong one fails now, with its name,
        # rather than deep inside a run.
        values.update(check_fields(cls, recipe, numbers_from_text=True))
    values.update({k: v for k, v in fixed.items() if v is not None})
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise InvalidInputError(f"missing required setting(s): {flags}")
    return cls(**values)
