"""YAML recipes (``--recipe file.yaml``) of ``talk2dino train``, ``extract`` and ``eval`` (house-style §3).

A recipe sets config fields first, flags override it (`talk2dino.cli.flags.build_config`), and unknown keys
are errors, not warnings. A nested config is a nested mapping (``inference: {pamr: true}`` in an eval recipe).

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
- Numeric settings must lie in the ranges their fields declare (``talk2dino.settings.meta``, e.g. ``epochs``
  in [1, 100000]); flags are held to the same ranges (`talk2dino.cli.flags.build_config`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from talk2dino.errors import InvalidInputError, one_line

YAML_HINT = ("recipes read unquoted values as YAML 1.2: write numbers in plain decimal (10, 0.5, 1e-4) and "
             "booleans as true/false")
_MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes; a bigger file is not one

# YAML 1.2 core-schema plain scalars (see the module docstring); anything else resolves to a string.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
# A dot or an exponent is required: "010" must not become 10.0 through the float rule.
_FLOAT = re.compile(r"^[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$")


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
                                   f"plain {kind}; {YAML_HINT}")
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
