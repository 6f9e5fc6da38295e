"""Help texts of the generated flags come from field metadata only, never from the source (issue 15 follow-up).

`talk2dino.settings.field_help` once fell back to the field line's trailing ``# comment``, read with
`inspect.getsource` at start-up: time spent on every start, and help texts silently empty in an install without
``.py`` sources (a zipapp, a frozen build). These tests build every subcommand's parser with source reading
broken, and hold every generated flag (and every setting of the configs the flags come from) to a help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing

import pytest

from talk2dino.cli.main import build_parser
from talk2dino.config import EvalConfig, ExtractConfig, InferenceConfig, TrainConfig
from talk2dino.server.config import ServerConfig
from talk2dino.settings import field_help, field_meta, meta

# The configs whose fields become flags (`talk2dino.cli.flags.add_config_flags`).
FLAG_CONFIGS = (InferenceConfig, ExtractConfig, TrainConfig, EvalConfig, ServerConfig)
_DEFAULT_SUFFIX = re.compile(r"\s*\(default .*\)$")
_SECTION = re.compile(r"§\s*[\d.]+")


@pytest.fixture
def no_source(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """`inspect.getsource` raising as in an install without .py files; returns the objects it was asked for."""
    asked: list[object] = []

    def unavailable(obj: object) -> str:
        asked.append(obj)
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", unavailable)
    return asked


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "talk2dino has subcommands"
    return dict(actions[0].choices)


def _generated_dests() -> set[str]:
    """Destinations of the flags generated from `FLAG_CONFIGS` (nested ones dotted, as eval's ``inference.pamr``)."""
    dests = set()
    for cls in FLAG_CONFIGS:
        for item in dataclasses.fields(cls):
            dests.add(item.name)
            dests.add(f"inference.{item.name}")
    return dests


def test_every_generated_flag_has_help_without_the_source(no_source: list[object]) -> None:
    generated = _generated_dests()
    checked = 0
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest not in generated:
                continue
            text = _DEFAULT_SUFFIX.sub("", action.help or "").strip()
            assert text, f"talk2dino {command} {action.option_strings[0]}: empty help"
            checked += 1
        sub.format_help()  # what `talk2dino <command> --help` prints; must not need the source either
    assert checked > 50  # segment, serve, extract, train, eval: their generated flags were all seen
    assert no_source == [], "building the parsers read class source"


@pytest.mark.parametrize("cls", FLAG_CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_of_a_flag_config_has_help_in_its_metadata(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):  # a nested config (eval's `inference`): not a flag itself
            continue
        text = field_meta(item).help
        assert text and _SECTION.sub("", text).strip(" ,"), f"{cls.__name__}.{item.name} has no help metadata"


def test_field_help_does_not_read_source(no_source: list[object]) -> None:
    fields = {f.name: f for f in dataclasses.fields(InferenceConfig)}
    assert field_help(fields["bg_threshold"]).startswith("background threshold theta")
    assert field_help(next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr")) == \
        "Adam learning rate, constant"

    @dataclasses.dataclass(frozen=True)
    class Commented:
        documented: int = dataclasses.field(default=1, metadata=meta(help="from the metadata"))
        plain: int = 2  # a comment is not help

    first, second = dataclasses.fields(Commented)
    assert field_help(first) == "from the metadata"
    assert field_help(second) == ""
    assert no_source == []


def test_help_keeps_section_references_out_of_the_flags() -> None:
    # The metadata keeps the method.md section; --help, for users without method.md, leaves it out.
    bg = next(f for f in dataclasses.fields(InferenceConfig) if f.name == "bg_threshold")
    assert "§4.6" in field_help(bg)
    segment = _subparsers(build_parser())["segment"]
    action = next(a for a in segment._actions if a.dest == "bg_threshold")
    assert action.help == "background threshold theta (0.55 ViT-B; ViT-L models use 0.54) (default 0.55)"
