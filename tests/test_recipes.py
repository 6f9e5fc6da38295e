"""Dataclass configs from YAML recipes and flags: precedence, types, unknown keys."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from talk2dino.config import TrainConfig
from talk2dino.recipes import add_dataclass_arguments, build_config, load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
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
