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

from talk2dino.config import EvalConfig, ExtractConfig, TrainConfig
from talk2dino.errors import Talk2DinoError
from talk2dino.recipes import build_config, load_recipe

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
