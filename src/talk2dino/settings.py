"""Settings declared once (house-style §3, issue 15): what a config field says about itself, and the one way
text becomes a setting's value.

A field of a config dataclass (`talk2dino.config`, `talk2dino.server.config`) is the only declaration of a
setting: its type, its default, and its metadata, written with `meta`: its help text (`field_help`, the help of
its flag), and what the type cannot say: a flag spelled otherwise than the field (``request_timeout_s`` is
``--request-timeout``), the old spellings still accepted, the allowed range, the help group. Everything else is
derived from that:

- `parse_text` turns text (a flag's value, an environment variable) into a value of the field's type. It is the
  one string-to-value parser: the generated flags (`talk2dino.cli.flags`) and `read_env` use it.
- `check_value` / `check_fields` check values that already have a type (a YAML recipe, a JSON model config).
- `check_ranges` holds values to the ranges in their fields' metadata; every config's ``validate()`` calls it.

Standard library only: importing this module costs nothing (``talk2dino --help`` must stay fast).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from talk2dino.errors import InvalidInputError

__all__ = ["MAX_TEXT_CHARS", "FieldMeta", "Range", "check_fields", "check_ranges", "check_value", "describe_type",
           "field_flag", "field_help", "field_meta", "field_values", "meta", "parse_text", "read_env", "short_repr",
           "text_parser", "to_json", "unwrap_optional"]

MAX_TEXT_CHARS = 4096
"""Longest string setting accepted from a file (a path, a source, a name)."""

_META_KEY = "talk2dino"  # the one key of `dataclasses.field(metadata=...)` these settings use
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``low <= v <= high`` (strict where `open_low` / `open_high`)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        """Whether `value` lies in the range; NaN fails every comparison and so is refused."""
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        def show(bound: float) -> str:
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        return f"{'(' if self.open_low else '['}{show(self.low)}, {show(self.high)}{')' if self.open_high else ']'}"


@dataclass(frozen=True)
class FieldMeta:
    """What a field says about itself beyond its type and default (see `meta`)."""

    flag: str | None = None
    aliases: tuple[str, ...] = ()
    help: str | None = None
    range: Range | None = None
    group: str | None = None
    repeat: bool = False
    metavar: str | None = None


def meta(*, flag: str | None = None, aliases: tuple[str, ...] = (), help: str | None = None,
         range: Range | None = None, group: str | None = None, repeat: bool = False,
         metavar: str | None = None) -> dict[str, FieldMeta]:
    """Field metadata: ``x: int = field(default=1, metadata=meta(range=Range(1, 10)))``.

    Args:
        flag: the command-line flag when it is not ``--`` plus the field name with ``-`` for ``_``.
        aliases: older flag spellings, still accepted with a logged deprecation warning.
        help: what the setting does, in a line: the help of its generated flag (`field_help`; method.md section
            references such as ``§4.6`` are kept here and left out of ``--help``).
        range: the allowed values (`check_ranges`); tuple fields are checked item by item.
        group: the title of the flag's argparse group, when not the one the caller gives.
        repeat: a tuple field whose flag is given once per item (``--url-allow-network A --url-allow-network B``).
        metavar: the flag's value placeholder in the help.
    """
    return {_META_KEY: FieldMeta(flag=flag, aliases=aliases, help=help, range=range, group=group, repeat=repeat,
                                 metavar=metavar)}


def field_meta(item: dataclasses.Field[Any]) -> FieldMeta:
    """The `FieldMeta` of a dataclass field (the defaults when it has none)."""
    found = item.metadata.get(_META_KEY)
    return found if isinstance(found, FieldMeta) else FieldMeta()


def field_flag(item: dataclasses.Field[Any]) -> str:
    """The flag of a field: its metadata's, else ``--`` plus the name with dashes (``max_steps`` -> ``--max-steps``)."""
    return field_meta(item).flag or "--" + item.name.replace("_", "-")


def field_help(item: dataclasses.Field[Any]) -> str:
    """A field's help text: its metadata's ``help`` (`meta`), else ``""``.

    The metadata is the one source: the class source is never read, so the help of the generated flags costs
    nothing at start-up and survives an install without ``.py`` files (a zipapp, a frozen build).
    """
    return field_meta(item).help or ""


def unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; any other type unchanged."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def describe_type(tp: Any) -> str:
    """A short name of a field type for messages (``int``, ``tuple[float, ...]``)."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def short_repr(value: Any) -> str:
    """`repr(value)` on one line, at most 80 characters (a hostile ``__repr__`` gives ``<unprintable>``)."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = "<unprintable>"
    text = " ".join(text.split())
    return (text[:77] + "...") if len(text) > 80 else text


# --- text -> value: flags and environment variables ----------------------------------------------------------


def parse_text(text: str, tp: Any) -> Any:
    """Text as a value of field type `tp`: the one string-to-value parser of flags and environment variables.

    ``int`` and ``float`` read as Python's `int` / `float` do (ranges are checked later, by ``validate()``:
    ``nan`` is refused there, naming the setting and its range); ``bool`` reads 1/0, true/false, yes/no, on/off
    (any case); a ``Literal`` reads its choices' type and must be one of them; a tuple reads a comma-separated
    list, each item of the tuple's item type (a fixed-length tuple must have that many); ``X | None`` reads as
    ``X``.

    Raises:
        ValueError: text that is not a value of `tp` (argparse words it as ``invalid <type> value``).
    """
    tp = unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        value = parse_text(text, type(choices[0]))
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = get_args(tp)
        items = [part.strip() for part in text.split(",") if part.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_text(item, args[0]) for item in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {len(items)}")
        return tuple(parse_text(item, arg) for item, arg in zip(items, args, strict=True))
    if tp is bool:
        word = text.strip().lower()
        if word not in _TRUE_WORDS + _FALSE_WORDS:
            raise ValueError(f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
        return word in _TRUE_WORDS
    if tp in (int, float, str):
        return tp(text)
    raise TypeError(f"unsupported setting type {tp!r}")


def text_parser(tp: Any) -> Callable[[str], Any]:
    """`parse_text` for one field type, as an argparse ``type=``; its ``__name__`` is what argparse's
    ``invalid <name> value`` error names (``int``, ``float``; ``list of float`` for a tuple)."""
    inner = unwrap_optional(tp)
    if get_origin(inner) is Literal:
        inner = type(get_args(inner)[0])  # argparse's `choices` then refuses a value outside them
    origin = get_origin(inner)

    def parse(text: str) -> Any:
        return parse_text(text, inner)

    if origin is tuple:
        parse.__name__ = f"list of {describe_type(get_args(inner)[0])}"
    else:
        parse.__name__ = describe_type(inner)
    return parse


def read_env(cls: type, prefix: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields of dataclass `cls` set in `environ` as ``<prefix><FIELD NAME IN UPPER CASE>``, parsed.

    Raises:
        InvalidInputError: a value that does not parse as its field's type (``TALK2DINO_SERVE_PORT='http' is not
            a valid int``).
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        name = prefix + item.name.upper()
        if name not in environ:
            continue
        raw = environ[name].strip()
        tp = hints[item.name]
        try:
            values[item.name] = parse_text(raw, tp)
        except ValueError as err:
            kind = unwrap_optional(tp)
            shown = "list" if get_origin(kind) is tuple else describe_type(kind)
            raise InvalidInputError(f"{name}={raw!r} is not a valid {shown}") from err
    return values


# --- typed values: recipes and JSON files ---------------------------------------------------------------------


def check_value(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML or JSON) as field type `tp`: lists become tuples, ints become floats for float fields.

    Raises:
        InvalidInputError: a value of another type, a non-finite float, an int beyond 64 bits, a string over
            `MAX_TEXT_CHARS` or holding NUL, or a list of over 1024 items; one line naming `where`.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, where)
            except InvalidInputError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else InvalidInputError(
            f"{where}: expected {describe_type(tp)}, got {short_repr(value)}")
    if origin is Literal:
        # bool is an int in Python: True must not pass for a Literal[1], nor 1 for "1".
        if any(value == choice and type(value) is type(choice) for choice in get_args(tp)):
            return value
        raise InvalidInputError(f"{where}: expected one of {list(get_args(tp))}, got {short_repr(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"{where}: expected a list, got {short_repr(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > 1024:
                raise InvalidInputError(f"{where}: list too long ({len(value)} items)")
            return tuple(check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InvalidInputError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 1 << 63:  # no real setting is this large, and torch/numpy would overflow on it
                raise InvalidInputError(f"{where}: number too large: {short_repr(value)}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1 << 53:
                raise InvalidInputError(f"{where}: number too large: {short_repr(value)}")
            if not math.isfinite(value):
                raise InvalidInputError(f"{where}: expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS or "\0" in value:
                raise InvalidInputError(f"{where}: string too long or holding a NUL character")
            return value
    else:
        raise InvalidInputError(f"{where}: unsupported field type {describe_type(tp)}")
    raise InvalidInputError(f"{where}: expected {describe_type(tp)}, got {short_repr(value)}")


def check_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Type-check `values` against the fields of dataclass `cls` (`check_value`); returns them converted.

    A field whose type is itself a dataclass takes a mapping, checked the same way (unknown keys refused), that
    changes the field's default.

    Raises:
        InvalidInputError: naming the first unknown key or the first value of a wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise InvalidInputError(f"unknown {cls.__name__} keys: {sorted(map(str, unknown))[:10]}; "
                                f"known: {sorted(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if isinstance(value, kind):
                out[key] = value
                continue
            if not isinstance(value, Mapping):
                raise InvalidInputError(f"{cls.__name__}.{key}: expected a mapping, got {short_repr(value)}")
            # The mapping changes the field's default (`EvalConfig.inference` is not `InferenceConfig()`).
            item = fields[key]
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            checked = check_fields(kind, value)
            out[key] = kind(**checked) if default is dataclasses.MISSING else dataclasses.replace(default, **checked)
        else:
            out[key] = check_value(value, kind, f"{cls.__name__}.{key}")
    return out


def check_ranges(cls: type, values: Mapping[str, Any]) -> None:
    """Refuse a numeric setting outside the range in its field's metadata; tuple fields are checked item by
    item; None (unset) and non-numbers pass (types are checked elsewhere).

    Raises:
        InvalidInputError: one line naming the setting, its flag, the range and the value
            (``TrainConfig.epochs (--epochs) must be in [1, 100000], got 0``).
    """
    for item in dataclasses.fields(cls):
        allowed = field_meta(item).range
        if allowed is None or item.name not in values:
            continue
        value = values[item.name]
        for one in value if isinstance(value, tuple) else (value,):
            if isinstance(one, (int, float)) and not isinstance(one, bool) and not allowed.holds(one):
                raise InvalidInputError(f"{cls.__name__}.{item.name} ({field_flag(item)}) must be in {allowed}, got "
                                        f"{short_repr(one)}")


def field_values(config: Any) -> dict[str, Any]:
    """A dataclass instance's fields as a dict, one level (nested configs stay objects)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def to_json(value: Any) -> Any:
    """`value` as JSON-native data: dataclasses become dicts of all their fields, tuples become lists; nothing is
    resolved or dropped (None stays None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
