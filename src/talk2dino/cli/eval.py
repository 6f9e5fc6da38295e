"""``talk2dino eval``: benchmarks -> results.json and results.md (flags from `EvalConfig`).

PAMR is off by default here (`talk2dino.config.EVAL_INFERENCE`: the paper's main rows, method.md §5.1), unlike
``segment``; ``--pamr`` and ``--bg-clean`` set ``EvalConfig.inference``, the list flags (``--bg-threshold
0.5,0.55``) sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from talk2dino.cli.flags import add_config_flags, build_config, set_help
from talk2dino.cli.recipes import load_recipe
from talk2dino.config import EvalConfig
from talk2dino.errors import InvalidInputError
from talk2dino.labels import split_labels

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)

EVAL_INFERENCE_FIELDS = ("pamr", "bg_clean")
"""The `EvalConfig.inference` fields with flags (the others are swept, or come from the model or benchmark)."""


def add_parser(sub: Any) -> None:
    """``talk2dino eval``: one flag per `EvalConfig` field (``--pamr``/``--bg-clean`` for its inference settings),
    plus --recipe and the comparisons (--models, --backbones with --projections)."""
    from talk2dino.evaluation import DATASET_NAMES, FOLDER_LAYOUT_HELP

    ev = sub.add_parser("eval", help="evaluate on the open-vocabulary benchmarks (mIoU)",
                        description="One benchmark (--dataset NAME --root DIR) or several (--suite all --data-root "
                                    "DIR) -> results.json and results.md with the paper's numbers beside ours. "
                                    "List-valued options (--bg-threshold 0.5,0.55) sweep. Resumable; runs under "
                                    "torchrun. Your own data: --dataset folder --root ROOT --classes-file FILE, "
                                    f"where {FOLDER_LAYOUT_HELP}. PAMR is off by default here (the paper's main "
                                    "rows; --pamr gives its '+ PAMR' rows), unlike `segment`, where it is on.")
    ev.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    ev.add_argument("--models", default=None,
                    help="comma-separated models to compare (the ablation table); overrides --model")
    ev.add_argument("--backbones", default=None,
                    help="comma-separated backbones to compare, each with the psi at the same position in "
                         "--projections (a psi is trained for one backbone)")
    ev.add_argument("--projections", default=None, help="comma-separated psi sources matching --backbones")
    # `inference_overrides` is no flag: `run` fills it from the recipe and the inference flags given.
    add_config_flags(ev, EvalConfig, title="Evaluation", nested={"inference": EVAL_INFERENCE_FIELDS},
                     exclude=("inference_overrides",))
    set_help(ev, "dataset", f"one benchmark: {', '.join(DATASET_NAMES)} (folder: your own data, with --root "
                            "and --classes-file)")
    set_help(ev, "inference.pamr", "PAMR mask refinement (default off in eval: the paper's rows without refinement; "
                                   "--pamr gives the '+ PAMR' rows. `segment` has it on by default)")
    set_help(ev, "inference.bg_clean", "background cleaning (default: each benchmark's published setting)")
    ev.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


def given_inference_fields(recipe: Mapping[str, Any] | None, args: argparse.Namespace) -> list[str]:
    """The `InferenceConfig` fields a recipe (its ``inference`` mapping, or an old flat key such as ``pamr``) or
    the flags (``--pamr``, ``--bg-clean``) set: `EvalConfig.inference_overrides`. Call after `build_config`,
    which has refused unknown keys."""
    names: list[str] = []
    if recipe:
        nested = recipe.get("inference")
        if isinstance(nested, Mapping):
            names.extend(str(key) for key in nested)
        names.extend(new.partition(".")[2] for old, new in EvalConfig.DEPRECATED_KEYS.items()
                     if old in recipe and new.startswith("inference."))
    names.extend(dest.partition(".")[2] for dest, value in vars(args).items()
                 if dest.startswith("inference.") and value is not None)
    return names


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand: results.json + results.md (one block per model with --models)."""
    from talk2dino.evaluation.runner import run_eval
    from talk2dino.fileio import atomic_write_bytes

    recipe = load_recipe(args.recipe) if args.recipe else None
    config = build_config(EvalConfig, args, recipe=recipe)
    # The inference settings given apply over the model's defaults even when equal to InferenceConfig's.
    config = dataclasses.replace(config, inference_overrides=(*config.inference_overrides,
                                                              *given_inference_fields(recipe, args)))
    progress = not (args.quiet or args.no_progress)
    variants: list[tuple[str, EvalConfig]] = []
    if args.backbones:
        backbones = split_labels(args.backbones, what="--backbones")
        projections = split_labels(args.projections, what="--projections") if args.projections else []
        if len(projections) != len(backbones):
            raise InvalidInputError(f"--backbones lists {len(backbones)} backbones but --projections "
                                    f"{len(projections)} psi files; give one psi per backbone")
        variants = [(b, dataclasses.replace(config, backbone=b, projection=p)) for b, p in zip(backbones, projections,
                                                                                             strict=True)]
    elif args.models:
        variants = [(name, dataclasses.replace(config, model=name)) for name in split_labels(args.models,
                                                                                             what="--models")]
    if not variants:
        sys.stdout.write(run_eval(config, progress=progress)["markdown"])
        return 0
    blocks = []
    for name, variant in variants:
        safe = name.replace("/", "_").replace(":", "_")
        result = run_eval(dataclasses.replace(variant, out=str(Path(config.out) / safe)), progress=progress)
        blocks.append(f"### {name}\n\n{result['markdown']}")
    table = "\n".join(blocks)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(config.out) / "ablation.md", table.encode("utf-8"))
    sys.stdout.write(table)
    return 0
