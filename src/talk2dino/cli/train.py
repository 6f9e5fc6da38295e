"""``talk2dino train``: psi from extracted features, a YAML recipe and flags (flags from `TrainConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from talk2dino.cli.flags import add_config_flags, build_config
from talk2dino.cli.recipes import load_recipe
from talk2dino.config import TrainConfig
from talk2dino.errors import InvalidInputError
from talk2dino.labels import split_labels

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)


def add_parser(sub: Any) -> None:
    """``talk2dino train``: one flag per `TrainConfig` field, plus --recipe, --resume and --head-selection."""
    train = sub.add_parser("train", help="train psi on extracted features",
                           description="Max-head InfoNCE training of psi (the text-to-DINO projection). The run "
                                       "folder loads as a model: talk2dino segment ... --model local-dir:RUN")
    train.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    add_config_flags(train, TrainConfig, title="Training")
    train.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    train.add_argument("--head-selection", default=None,
                       help="comma list of strategies (max,avg,cls,cls-weighted): one run each under --out/<name>, "
                            "plus a combined ablation table")
    train.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """The ``train`` subcommand (one run, or one per --head-selection strategy plus a table)."""
    from talk2dino.training.run import run_train

    config = build_config(TrainConfig, args, recipe=load_recipe(args.recipe) if args.recipe else None)
    progress = not (args.quiet or args.no_progress)
    if not args.head_selection:
        out = run_train(config, progress=progress, resume=bool(args.resume))
        logger.info("model folder written to %s (use --model local-dir:%s)", out, out)
        return 0
    from talk2dino.fileio import atomic_write_bytes
    from talk2dino.training.ablation import ablation_table
    from talk2dino.training.strategies import STRATEGIES

    strategies = split_labels(args.head_selection, what="--head-selection")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise InvalidInputError(f"--head-selection: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    runs: dict[str, str | os.PathLike[str]] = {}
    for strategy in (s for s in STRATEGIES if s in strategies):
        run_config = dataclasses.replace(config, target_strategy=strategy, out=str(Path(config.out) / strategy))
        runs[strategy] = run_train(run_config, progress=progress, resume=bool(args.resume))
    table = ablation_table(runs)
    atomic_write_bytes(Path(config.out) / "ablation.md", table.encode("utf-8"))
    sys.stdout.write(table)
    return 0
