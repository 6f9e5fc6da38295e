"""Dataclass configs <-> command-line flags and YAML recipes (house-style §3, §6).

Every field of a config dataclass becomes a flag (``lr`` -> ``--lr``) whose default is None, so the
dataclass stays the single source of defaults; a YAML recipe (``--recipe file.yaml``) sets fields
first, flags override it, and unknown keys are errors, not warnings.

How a recipe is read (`load_recipe`):

- Plain YAML only: no Python tags, so a recipe can never build objects.
- A key given twice in one mapping, at any depth, is an error naming the key and both lines (PyYAML
  would keep the last one silently: ``epochs: 100000000`` hidden below ``epochs: 10``). Merge keys
  (``<<``) are refused for the same reason: they override keys silently.
- Unquoted values follow YAML 1.2's core schema, not PyYAML's YAML 1.1: only ``true``/``false``
  (any case of those two words) are booleans, only ``null``, ``~`` and an empty value are null, only
  plain decimal integers (``10``, ``-3``; no leading zero) are integers and only plain decimal floats
  (``0.5``, ``.5``, ``1e-4``, ``1.5E+3``) are floats. Everything else is a string: ``yes``/``no``/``on``/
  ``off``/``y``/``n``, ``1:20`` (YAML 1.1's base 60), ``010`` (octal), ``0x1F``, ``0b11``, ``1_000``,
  ``.inf``/``.nan`` and dates such as ``2001-12-14``. A string given to a number or boolean setting is
  then refused by the setting's type check, with a hint to write the value plainly, instead of becoming
  80, True, 8 or a date.
- Numeric settings must lie in the ranges of ``talk2dino.config._RUN_LIMITS`` (e.g. ``epochs`` in
  [1, 100000]); flags are held to the same ranges (`build_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from talk2dino.config import check_fields, check_ranges
from talk2dino.errors import InvalidInputError, one_line

T = TypeVar("T")
_MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; a bigger file is not one

# YAML 1.2 core-schema plain scalars (see the module docstring); anything else resolves to a string.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
# A dot or an exponent is required: "010" must not become 10.0 through the float rule.
_FLOAT = re.compile(r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$")
_YAML_HINT = ("recipes read unquoted values as YAML 1.2: write numbers in plain decimal (10, 0.5, 1e-4) and "
              "booleans as true/false")


class _RecipeError(Exception):
    """A recipe problem found while parsing; `load_recipe` prefixes the file name."""


class Recipe(dict[str, Any]):
    """A recipe's settings (a plain dict) that remembers the file it was read from, for error messages."""

    source: str = "recipe"


@functools.cache
def _yaml_loader() -> type:
    """The recipe loader class: PyYAML's safe constructor with duplicate-key refusal and YAML 1.2 scalars.

    Built on first use (and kept), so that importing this module does not import yaml.
    """
    from yaml.composer import Composer
    from yaml.constructor import ConstructorError, SafeConstructor
    from yaml.nodes import MappingNode
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.resolver import BaseResolver
    from yaml.scanner import Scanner

    class Resolver(BaseResolver):
        """Implicit tags of YAML 1.2's core schema only (no base-60, octal, hex, yes/no, timestamps, merge)."""

    for tag, pattern, first in (
            ("bool", _BOOL, list("tTfF")),
            ("int", _INT, list("-+0123456789")),  # before float: both start with a digit, int is tried first
            ("float", _FLOAT, list("-+0123456789.")),
            ("null", _NULL, ["~", "n", "N", ""])):
        Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", pattern, first)

    class Constructor(SafeConstructor):
        """Safe constructor refusing duplicate and merge keys; explicit ``!!int``/``!!float``/``!!bool`` tags
        are held to the same plain forms as untagged values (``!!int 0x1F`` would otherwise read as hex)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if not isinstance(node, MappingNode):
                raise ConstructorError(None, None, f"expected a mapping node, but found {node.id}", node.start_mark)
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _RecipeError(f"merge key '<<' on line {key_node.start_mark.line + 1} is not supported "
                                       "(it overrides keys silently); write each setting once")
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = first_line.get(key)
                except TypeError:  # an unhashable key ([a, b]: 1); PyYAML words that error itself
                    continue
                line = key_node.start_mark.line + 1
                if seen is not None:
                    raise _RecipeError(f"key '{one_line(key, max_chars=60)}' is given twice (lines {seen} and "
                                       f"{line}); each setting may appear once")
                first_line[key] = line
            return super().construct_mapping(node, deep=deep)

        def _plain(self, node: Any, kind: str, *patterns: re.Pattern[str]) -> str:
            """The scalar's text if one of `patterns` matches it (a tagged ``!!int 0x1F`` does not)."""
            text = self.construct_scalar(node)
            if not any(pattern.match(text) for pattern in patterns):
                raise _RecipeError(f"'{one_line(text, max_chars=60)}' on line {node.start_mark.line + 1} is not a "
                                   f"plain {kind}; {_YAML_HINT}")
            return str(text)

        def construct_yaml_int(self, node: Any) -> int:
            return int(self._plain(node, "decimal integer", _INT))

        def construct_yaml_float(self, node: Any) -> float:
            return float(self._plain(node, "decimal number", _FLOAT, _INT))

        def construct_yaml_bool(self, node: Any) -> bool:
            return self._plain(node, "boolean (true or false)", _BOOL).lower() == "true"

    for tag in ("int", "float", "bool"):
        Constructor.add_constructor(f"tag:yaml.org,2002:{tag}", getattr(Constructor, f"construct_yaml_{tag}"))

    class Loader(Reader, Scanner, Parser, Composer, Constructor, Resolver):
        """PyYAML's SafeLoader pipeline with the recipe constructor and resolver."""

        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)
            Constructor.__init__(self)
            Resolver.__init__(self)

    return Loader


def parse_recipe_text(text: str) -> Any:
    """Parse recipe text with the recipe rules (module docstring); the document, or None when empty.

    Raises:
        InvalidInputError: a key given twice, a merge key, an explicitly tagged number in a non-plain form,
            or YAML that does not parse (one line, without a file name).
    """
    import yaml

    # The loader is driven directly (what yaml.load does): its constructor is PyYAML's SafeConstructor, so
    # python/* tags are refused as by yaml.safe_load.
    loader = None
    try:
        loader = _yaml_loader()(text)  # the reader already refuses control characters here
        return loader.get_single_data()
    except _RecipeError as err:
        raise InvalidInputError(str(err)) from err
    except (ValueError, yaml.YAMLError, RecursionError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[:2])[:300] or type(err).__name__
        raise InvalidInputError(f"cannot read recipe ({one_line(detail, max_chars=300)})") from err
    finally:
        if loader is not None:
            loader.dispose()


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


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML (or JSON) recipe into a flat dict, by the rules of the module docstring.

    Raises:
        InvalidInputError: (a ``ValueError``) unreadable file, not YAML, too large, a key given twice,
            or not a mapping with string keys; one line naming the file.
    """
    try:
        if Path(path).stat().st_size > _MAX_RECIPE_BYTES:
            raise InvalidInputError(f"{path}: too large for a recipe (over {_MAX_RECIPE_BYTES} bytes)")
        text = Path(path).read_bytes().decode("utf-8")
    except InvalidInputError:
        raise
    except (OSError, ValueError) as err:
        # ValueError covers undecodable UTF-8.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join(lines[:2])[:300] or type(err).__name__
        raise InvalidInputError(f"{path}: cannot read recipe ({one_line(detail, max_chars=300)})") from err
    try:
        data = parse_recipe_text(text)
    except InvalidInputError as err:
        raise InvalidInputError(f"{path}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a recipe must be a mapping of field: value, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"{path}: recipe keys must be field names, got {one_line(repr(bad[0]), 60)}")
    recipe = Recipe(data)
    recipe.source = str(path)
    return recipe


def build_config(cls: type[T], args: argparse.Namespace | None = None, *, recipe: dict[str, Any] | None = None,
                 **fixed: Any) -> T:
    """Recipe values, then `fixed`, then non-None flags -> a validated dataclass instance.

    Raises:
        InvalidInputError: (a ``ValueError``) unknown keys or values of a wrong type in the recipe, a
            numeric setting (from the recipe or a flag) outside its range (`talk2dino.config.check_ranges`),
            or a missing required field.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if recipe:
        source = one_line(getattr(recipe, "source", "recipe"), max_chars=1000)
        unknown = sorted(str(k) for k in recipe if k not in names)
        if unknown:
            shown = [one_line(k, max_chars=60) for k in unknown[:10]]
            raise InvalidInputError(f"{source}: unknown {cls.__name__} keys in recipe: {shown}")
        # Recipes are files: check every value's type and range here, so a wrong one fails now, naming the
        # file and the setting, rather than deep inside a run. Text is not read as a number: the loader
        # already reads plain numbers (1e-4 included), so a string here is a quoted or YAML-1.1-only form
        # ("1:20", "0x1F", "yes").
        for key, value in recipe.items():
            try:
                values.update(check_fields(cls, {key: value}))
            except InvalidInputError as err:
                hint = f"; {_YAML_HINT}" if isinstance(value, str) else ""
                raise InvalidInputError(f"{source}: {err}{hint}") from err
        try:
            check_ranges(cls, values)
        except InvalidInputError as err:
            raise InvalidInputError(f"{source}: {err}") from err
    values.update({k: v for k, v in fixed.items() if v is not None})
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    check_ranges(cls, values)
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise InvalidInputError(f"missing required setting(s): {flags}")
    return cls(**values)
