"""Property tests: any YAML text or JSON-like document given to the recipe loader.

`load_recipe` + `build_config` either give a valid config dataclass or raise a one-line
`Talk2DinoError` (an `InvalidInputError`, which is also a ``ValueError`` for older callers). The
committed corpus under ``corpus/recipes/`` (from ``make_checkpoint_corpus.py``) replays every case.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talk2dino.cli.flags import build_config
from talk2dino.cli.recipes import load_recipe, parse_recipe_text
from talk2dino.config import EvalConfig, ExtractConfig, TrainConfig
from talk2dino.errors import InvalidInputError, Talk2DinoError
from talk2dino.settings import field_meta

CORPUS = Path(__file__).resolve().parent / "corpus" / "recipes"
_CONFIGS = (TrainConfig, ExtractConfig, EvalConfig)


def load_recipe_file(path: Path, cls: type = TrainConfig) -> Any:
    """The CLI's recipe path for `cls`; None if refused with a one-line `Talk2DinoError`."""
    try:
        return build_config(cls, recipe=load_recipe(path))
    except Talk2DinoError as err:
        message = str(err)
        assert message and "\n" not in message, f"multi-line error for {path.name}: {message!r}"
        return None


def _check_valid(config: Any) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float):
            assert math.isfinite(value), f.name


def test_corpus_is_large_enough() -> None:
    assert len(list(CORPUS.glob("*.yaml"))) >= 50


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_corpus(path: Path) -> None:
    config = load_recipe_file(path)
    if config is not None:
        _check_valid(config)
    if path.name.startswith("valid"):
        assert config is not None, path.name
    elif not path.name.startswith(("damaged-", "merge-key")):
        assert config is None, f"{path.name} should be refused"
    if path.name.startswith(("duplicate-key", "yaml11-", "tagged-")):
        with pytest.raises(Talk2DinoError, match="given twice|expected|not a plain|unknown"):
            build_config(TrainConfig, recipe=load_recipe(path))


def test_yaml_1_1_floats_are_read_as_floats(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("features: f\nout: o\nlr: 1e-4\n", encoding="utf-8")
    assert load_recipe_file(tmp_path / "r.yaml").lr == pytest.approx(1e-4)


_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
            | st.sampled_from(["1e-4", ".nan", "max", "hf-hub:a/b", "~", "yes"]))
_VALUES = st.recursive(
    _SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)
_NAMES = sorted({f.name for cls in _CONFIGS for f in dataclasses.fields(cls)} | {"evil", ""})


@_SETTINGS
@given(doc=st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=6) | _VALUES,
       cls=st.sampled_from(_CONFIGS))
def test_arbitrary_recipe_documents(doc: Any, cls: type) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        config = load_recipe_file(path, cls)
        if config is not None:
            _check_valid(config)


@_SETTINGS
@given(text=st.text(max_size=300) | st.binary(max_size=300), cls=st.sampled_from(_CONFIGS))
def test_arbitrary_recipe_text(text: str | bytes, cls: type) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        config = load_recipe_file(path, cls)
        if config is not None:
            _check_valid(config)


# --- issue 14: duplicate keys, YAML 1.1 scalars, ranges ------------------------------------------------------

_KEY = (st.sampled_from([n for n in _NAMES if n])
        | st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda k: k not in ("true", "false", "null")))
_PLAIN = st.sampled_from(["1", "0.5", "f", "true", "~", "[1, 2]", "{a: 1}", "'x'"])


@_SETTINGS
@given(keys=st.lists(_KEY, min_size=1, max_size=6, unique=True), values=st.lists(_PLAIN, min_size=7, max_size=7),
       repeat=st.integers(0, 5), where=st.integers(0, 6), depth=st.integers(0, 2))
def test_a_key_given_twice_is_always_refused(keys: list[str], values: list[str], repeat: int, where: int,
                                             depth: int) -> None:
    """A mapping that names one key twice, at the top or nested `depth` levels down, is refused with the key
    and both line numbers, whatever else the recipe holds."""
    repeated = keys[repeat % len(keys)]
    entries = [f"{k}: {v}" for k, v in zip(keys, values, strict=False)]
    position = len(entries) if where > len(entries) else where
    position = max(position, keys.index(repeated) + 1)  # after the first occurrence
    entries.insert(position, f"{repeated}: {values[-1]}")
    indent = "  " * depth
    lines = [f"{'  ' * d}n{d}:" for d in range(depth)] + [indent + e for e in entries]
    first, second = depth + keys.index(repeated) + 1, depth + position + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(InvalidInputError) as info:
            load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"key '{repeated}' is given twice (lines {first} and {second})" in message, message


_YAML11 = (st.builds(lambda a, b: f"{a}:{b:02d}", st.integers(1, 999), st.integers(0, 59))  # base 60
           | st.from_regex(r"[-+]?0[0-7]+", fullmatch=True)  # octal
           | st.from_regex(r"[-+]?0x[0-9a-fA-F]+", fullmatch=True)
           | st.from_regex(r"[-+]?0b[01]+", fullmatch=True)
           | st.from_regex(r"[1-9][0-9]{0,3}(_[0-9]{1,3})+(\.[0-9]+)?", fullmatch=True)  # underscores
           | st.sampled_from(["yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "y",
                              "Y", "n", "N", ".inf", "-.inf", "+.Inf", ".INF", ".nan", ".NaN", ".NAN"])
           | st.dates().map(str))


@_SETTINGS
@given(text=_YAML11, field=st.sampled_from(["epochs", "seed", "lr", "temperature", "on_device", "batch_size"]))
def test_yaml_1_1_only_scalars_are_text_and_refused_for_typed_settings(text: str, field: str) -> None:
    """What only YAML 1.1 reads as a number, boolean or date stays the text written; a number or boolean
    setting then refuses it, naming the setting (never 80 for 1:20, True for yes, 8 for 010)."""
    assert parse_recipe_text(f"v: {text}\n") == {"v": text}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(f"features: f\nout: o\n{field}: {text}\n", encoding="utf-8")
        with pytest.raises(InvalidInputError) as info:
            build_config(TrainConfig, recipe=load_recipe(path))
    assert f"TrainConfig.{field}: expected" in str(info.value) and "\n" not in str(info.value)


@_SETTINGS
@given(value=st.integers(-(10**30), 10**30) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans())
def test_plain_numbers_and_booleans_keep_their_value(value: int | float | bool) -> None:
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    parsed = parse_recipe_text(f"v: {text}\n")["v"]
    assert parsed == value and type(parsed) is type(value)


_RANGED = {f.name: field_meta(f).range for f in dataclasses.fields(TrainConfig)
           if field_meta(f).range is not None and f.name not in ("betas", "recall_ks")}


@_SETTINGS
@given(field=st.sampled_from(sorted(_RANGED)), value=st.integers(-(2**70), 2**70) | st.floats(allow_nan=False))
def test_numeric_settings_load_exactly_inside_their_range(field: str, value: int | float) -> None:
    """A recipe number loads iff it has the setting's type and lies in the documented range."""
    expects_int = _RANGED[field].low == int(_RANGED[field].low) and field not in ("lr", "eps", "weight_decay",
                                                                                  "temperature")
    text = repr(value) if math.isfinite(value) else ("-.inf" if value < 0 else ".inf")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(f"features: f\nout: o\n{field}: {text}\n", encoding="utf-8")
        config = load_recipe_file(path)
    typed = isinstance(value, int) or not expects_int
    inside = math.isfinite(value) and abs(value) < 2**63 and _RANGED[field].holds(value)
    assert (config is not None) == (typed and inside), (field, value)
    if config is not None:
        assert getattr(config, field) == value
