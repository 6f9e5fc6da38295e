"""Command-line flags generated from config dataclasses, and configs built back from them (house-style §3, §6).

Every field of a config dataclass becomes a flag whose default is None, so that the dataclass stays the single
source of defaults: ``lr`` -> ``--lr``, or the flag its metadata names (``request_timeout_s`` ->
``--request-timeout``); the help is the field's ``help`` metadata; booleans get ``--x/--no-x``; ``Literal`` types
become choices; tuples read a comma list (or, with ``repeat``, one flag per item); values are read by
`talk2dino.settings.parse_text`, the parser environment variables use too. Older spellings in the metadata
(``aliases``) still work, hidden from the help, with a logged deprecation warning.

`build_config` then layers a recipe (`talk2dino.cli.recipes`), fixed values and the flags given, and validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from talk2dino.cli.recipes import YAML_HINT
from talk2dino.config import upgrade_keys
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.settings import (
    check_fields,
    check_ranges,
    field_flag,
    field_help,
    field_meta,
    text_parser,
    unwrap_optional,
)

logger = logging.getLogger("talk2dino.cli")

T = TypeVar("T")
DEPRECATED_DEST = "deprecated_flags"
"""Namespace attribute listing the deprecated flag spellings given (``main`` logs one warning each)."""


class _DeprecatedAlias(argparse.Action):
    """An old flag spelling: stores like the current flag and records itself for a warning."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, current: str, convert: Callable[[str], Any],
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.current = current
        self.convert = convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            value = self.convert(values)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentError(self, f"invalid value: {values!r}") from err
        setattr(namespace, self.dest, value)
        used = list(getattr(namespace, DEPRECATED_DEST, None) or [])
        used.append(f"{option_string} is deprecated; use {self.current}")
        setattr(namespace, DEPRECATED_DEST, used)


_SECTION_REFERENCE = re.compile(r",?\s*\(?§\s*[\d.]+(?:,\s*§?\s*[\d.]+)*\)?")

def _group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The argument group of `parser` called `title` (created once)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, title: str,
                     only: Sequence[str] | None = None, exclude: Sequence[str] = (),
                     nested: Mapping[str, Sequence[str]] | None = None, prefix: str = "") -> None:
    """Add one flag per field of dataclass `cls` to `parser` (default None), under the group `title` (or the
    field's own ``group``).

    Args:
        only: the fields to add, in the class's order (default: all).
        exclude: fields to leave out.
        nested: for a field whose type is a dataclass, the fields of that dataclass to add in its place; their
            destination is dotted (``inference.pamr``) and `build_config` puts them in the nested config.
        prefix: destination prefix of every flag (used for the nested fields).
    """
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in exclude or (only is not None and item.name not in only):
            continue
        kind = hints[item.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if nested and item.name in nested:
                add_config_flags(parser, kind, title=title, only=nested[item.name], prefix=f"{prefix}{item.name}.")
            continue
        info = field_meta(item)
        # The field comments cite method.md sections (a developer's document users do not have): not in --help.
        help_text = _SECTION_REFERENCE.sub("", field_help(item)).replace("%", "%%")
        if item.default is not dataclasses.MISSING and item.default is not None:  # None reads as "(default None)"
            help_text += f" (default {item.default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": None, "dest": prefix + item.name, "help": help_text}
        inner = unwrap_optional(kind)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif info.repeat:
            kwargs.update(action="append", type=text_parser(typing.get_args(inner)[0]))
        else:
            kwargs["type"] = text_parser(kind)
            if typing.get_origin(inner) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(inner))
            elif typing.get_origin(inner) is tuple:
                kwargs["metavar"] = "A,B,..."
        flag = field_flag(item)
        if info.metavar:
            kwargs["metavar"] = info.metavar
        elif inner is not bool and "choices" not in kwargs and "metavar" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # the flag's name, not the field's
        group = _group(parser, info.group or title)
        group.add_argument(flag, **kwargs)
        for alias in info.aliases:
            group.add_argument(alias, action=_DeprecatedAlias, dest=prefix + item.name, default=None, current=flag,
                               convert=kwargs.get("type", str), help=argparse.SUPPRESS)


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `cls` given in `args` (not None), nested ones gathered into mappings (``inference.pamr`` ->
    ``{"inference": {"pamr": ...}}``); lists from repeatable flags become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        head, _, tail = dest.partition(".")
        if head not in names:
            continue
        if tail:
            values.setdefault(head, {})[tail] = value
        else:
            values[head] = value
    return values


def _merge(cls: type, values: dict[str, Any], changes: Mapping[str, Any]) -> None:
    """Apply `changes` to `values` in place; a mapping for a nested config changes only the fields it names."""
    hints = typing.get_type_hints(cls)
    for name, value in changes.items():
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            base = values.get(name)
            if base is None:
                default = next(f for f in dataclasses.fields(cls) if f.name == name)
                base = default.default_factory() if default.default_factory is not dataclasses.MISSING \
                    else default.default
            values[name] = dataclasses.replace(base, **value) if base is not dataclasses.MISSING else kind(**value)
        else:
            values[name] = value


def build_config(cls: type[T], args: argparse.Namespace | None = None, *, recipe: Mapping[str, Any] | None = None,
                 **fixed: Any) -> T:
    """Recipe values, then `fixed` (None ignored), then the flags given -> a validated dataclass instance.

    Recipe keys a config renamed (its ``DEPRECATED_KEYS``, e.g. `EvalConfig`'s flat ``pamr``) are read with a
    logged deprecation warning.

    Raises:
        InvalidInputError: (a ``ValueError``) unknown keys or values of a wrong type in the recipe, a numeric
            setting (from the recipe or a flag) outside its range, a missing required field, or what the
            config's ``validate()`` refuses.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if recipe:
        source = one_line(getattr(recipe, "source", "recipe"), max_chars=1000)
        data = upgrade_keys(cls, recipe, warn=lambda message: logger.warning("%s: %s", source, message))
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            shown = [one_line(k, max_chars=60) for k in unknown[:10]]
            raise InvalidInputError(f"{source}: unknown {cls.__name__} keys in recipe: {shown}")
        # Recipes are files: check every value's type and range here, so a wrong one fails now, naming the file
        # and the setting, rather than deep inside a run. Text is not read as a number: the loader already reads
        # plain numbers (1e-4 included), so a string here is a quoted or YAML-1.1-only form ("1:20", "0x1F").
        for key, value in data.items():
            try:
                values.update(check_fields(cls, {key: value}))
            except InvalidInputError as err:
                hint = f"; {YAML_HINT}" if isinstance(value, str) else ""
                raise InvalidInputError(f"{source}: {err}{hint}") from err
        try:
            check_ranges(cls, values)
        except InvalidInputError as err:
            raise InvalidInputError(f"{source}: {err}") from err
    _merge(cls, values, {k: v for k, v in fixed.items() if v is not None})
    if args is not None:
        _merge(cls, values, flag_values(cls, args))
    check_ranges(cls, values)
    missing = [f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise InvalidInputError(f"missing required setting(s): {', '.join(field_flag(f) for f in missing)}")
    config = cls(**values)
    config.validate()  # type: ignore[attr-defined]
    return config


def set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace the generated help of the flag stored in `dest` (to describe what the config cannot)."""
    for action in parser._actions:
        if action.dest == dest:
            action.help = text
