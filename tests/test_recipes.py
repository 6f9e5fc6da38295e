"""Dataclass configs from YAML recipes and flags: precedence, types, unknown keys."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from talk2dino.cli.flags import add_config_flags, build_config
from talk2dino.cli.recipes import load_recipe
from talk2dino.config import TrainConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig, title="Training")
    return parser


def test_flags_override_recipe_which_overrides_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("features: feats\nout: run\nlr: 0.001\nepochs: 5\nbetas: [0.8, 0.9]\n", encoding="utf-8")
    args = _parser().parse_args(["--epochs", "7", "--no-loss-divide-by-batch-squared", "--recall-ks", "1,3"])
    config = build_config(TrainConfig, args, recipe=load_recipe(recipe))
    assert config.lr == 0.001 and config.epochs == 7 and config.betas == (0.8, 0.9)
    assert config.loss_divide_by_batch_squared is False and config.recall_ks == (1, 3)
    assert config.batch_size == TrainConfig.batch_size  # untouched default comes from the dataclass


def test_unknown_recipe_key_and_missing_required_field(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("features: f\nout: o\nlearning_rate: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys in recipe: \['learning_rate'\]"):
        build_config(TrainConfig, recipe=load_recipe(recipe))
    with pytest.raises(ValueError, match="missing required setting.*--features"):
        build_config(TrainConfig, _parser().parse_args(["--out", "o"]))


def test_literal_fields_become_choices() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--target-strategy", "median"])


# ------------------------------------------------------------------------------------------------------------
# Settings declared once (issue 15): flags and environment variables come from the config fields.
# ------------------------------------------------------------------------------------------------------------


def test_every_server_field_is_a_serve_flag_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from talk2dino.cli.main import build_parser
    from talk2dino.cli.serve import serve_config
    from talk2dino.server.config import ServerConfig
    from talk2dino.settings import field_flag

    parser = build_parser()
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    flags = [field_flag(item) for item in dataclasses.fields(ServerConfig)]
    assert all(flag in serve_help for flag in flags), [f for f in flags if f not in serve_help]
    assert {"--request-timeout", "--body-timeout", "--shutdown-grace", "--url-timeout", "--url-allow-network",
            "--retry-after"} <= set(flags)
    monkeypatch.setenv("TALK2DINO_SERVE_REQUEST_TIMEOUT_S", "7.5")
    monkeypatch.setenv("TALK2DINO_SERVE_RETRY_AFTER_S", "9")
    config = serve_config(parser.parse_args(["serve", "--retry-after", "3", "--url-allow-network", "10.0.0.0/8"]))
    assert (config.request_timeout_s, config.retry_after_s, config.url_allow_networks) == (7.5, 3, ("10.0.0.0/8",))


def test_one_text_parser_for_flags_and_environment() -> None:
    from typing import Literal

    from talk2dino.settings import parse_text, text_parser

    assert parse_text("0.5, 0.55", tuple[float, ...]) == (0.5, 0.55)
    assert parse_text("Yes", bool) is True and parse_text("off", bool) is False
    assert parse_text("7", int | None) == 7
    assert parse_text("cls", Literal["max", "cls"]) == "cls"
    for text, tp in (("many", int), ("maybe", bool), ("0.9", tuple[float, float]), ("median", Literal["max"])):
        with pytest.raises(ValueError):
            parse_text(text, tp)
    assert text_parser(int).__name__ == "int" and text_parser(tuple[int, ...]).__name__ == "list of int"


def _eval_parser() -> argparse.ArgumentParser:
    from talk2dino.cli.main import build_parser

    return build_parser()


def test_eval_holds_an_inference_config_with_pamr_off() -> None:
    from talk2dino.config import EVAL_INFERENCE, EvalConfig, InferenceConfig

    config = build_config(EvalConfig, _eval_parser().parse_args(["eval", "--dataset", "voc21"]))
    assert config.inference == EVAL_INFERENCE and config.inference.pamr is False  # method.md §5.1 main rows
    assert config.protocol_changes(background=True, bg_clean=False) == {"background": True, "pamr": False,
                                                                        "bg_clean": False}
    config = build_config(EvalConfig, _eval_parser().parse_args(["eval", "--dataset", "voc21", "--pamr",
                                                                  "--no-bg-clean", "--clean-lambda", "0.1,0.3"]))
    assert (config.inference.pamr, config.inference.bg_clean, config.clean_lambda) == (True, False, (0.1, 0.3))
    # Other inference fields apply when they differ from InferenceConfig's defaults; θ stays the model's.
    changed = EvalConfig(inference=InferenceConfig(pamr=False, window_batch_size=2))
    assert changed.protocol_changes(background=False, bg_clean=True) == {
        "window_batch_size": 2, "background": False, "pamr": False, "bg_clean": True}


def test_old_eval_keys_and_flag_still_work_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import logging
    import warnings

    from talk2dino.cli import main
    from talk2dino.config import EvalConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: voc21\npamr: true\nbg_clean: false\nbg_clean_lambda: [0.5]\n"
                      "inference:\n  window_batch_size: 4\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="talk2dino.cli"):
        config = build_config(EvalConfig, _eval_parser().parse_args(["eval"]), recipe=load_recipe(recipe))
    assert (config.inference.pamr, config.inference.bg_clean, config.clean_lambda) == (True, False, (0.5,))
    assert config.inference.window_batch_size == 4
    assert sum("is deprecated" in r.getMessage() for r in caplog.records) == 3
    with pytest.warns(DeprecationWarning, match="'bg_clean_lambda' is deprecated"):
        loaded = EvalConfig.from_dict({"dataset": "voc21", "bg_clean_lambda": [0.3]})
    with pytest.warns(DeprecationWarning, match="EvalConfig.bg_clean_lambda is deprecated"):
        assert loaded.bg_clean_lambda == (0.3,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EvalConfig.from_dict({"dataset": "voc21", "clean_lambda": [0.3]}).clean_lambda == (0.3,)
    with pytest.raises(ValueError, match="'pamr' and 'inference.pamr' both given"), pytest.warns(DeprecationWarning):
        EvalConfig.from_dict({"pamr": True, "inference": {"pamr": False}})
    args = _eval_parser().parse_args(["eval", "--bg-clean-lambda", "0.1,0.2"])
    assert build_config(EvalConfig, args).clean_lambda == (0.1, 0.2)
    capsys.readouterr()
    assert main(["eval", "--bg-clean-lambda", "0.1", "--limit", "0"]) == 2  # stops at the range check
    err = capsys.readouterr().err
    assert "WARNING talk2dino.cli: --bg-clean-lambda is deprecated; use --clean-lambda" in err
    assert "EvalConfig.limit (--limit) must be in [1, 1000000000], got 0" in err


def test_every_config_validates() -> None:
    from talk2dino.config import (
        BackboneConfig,
        EvalConfig,
        ExtractConfig,
        InferenceConfig,
        ModelConfig,
        ProjectionConfig,
        TextConfig,
        TrainConfig,
    )
    from talk2dino.errors import InvalidInputError
    from talk2dino.server.config import ServerConfig

    model = ModelConfig(name="x", backbone=BackboneConfig(source="s"), text=TextConfig(source="t"),
                        projection=ProjectionConfig(source=None))
    for config in (model, model.backbone, model.text, model.projection, InferenceConfig(), EvalConfig(),
                   ExtractConfig(coco_root="c"), TrainConfig(features="f", out="o"), ServerConfig()):
        config.validate()
    for bad in (TrainConfig(features="f", out="o", epochs=0), ExtractConfig(coco_root="c", num_workers=-1),
                EvalConfig(short_side=(0,)), EvalConfig(inference=InferenceConfig(window_batch_size=0)),
                TextConfig(source="t", context_length=2), ProjectionConfig(source=None, sha256="xyz")):
        with pytest.raises(InvalidInputError):
            bad.validate()
