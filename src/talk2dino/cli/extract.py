"""``talk2dino extract``: COCO Captions plus images -> sharded training features (flags from `ExtractConfig`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from talk2dino.cli.flags import add_config_flags, build_config
from talk2dino.cli.recipes import load_recipe
from talk2dino.config import ExtractConfig

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)


def add_parser(sub: Any) -> None:
    """``talk2dino extract``: one flag per `ExtractConfig` field, plus --recipe."""
    ext = sub.add_parser("extract", help="extract training features from COCO Captions",
                         description="Per image the per-head attention-weighted patch embeddings, the head-averaged "
                                     "embedding and the CLS token; per caption the raw CLIP embedding. Resumable; "
                                     "run under torchrun for several GPUs.")
    ext.add_argument("--recipe", default=None, help="YAML file of settings (flags override it)")
    add_config_flags(ext, ExtractConfig, title="Extraction")
    ext.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """The ``extract`` subcommand."""
    from talk2dino.extract.run import run_extract

    config = build_config(ExtractConfig, args, recipe=load_recipe(args.recipe) if args.recipe else None)
    out = run_extract(config, progress=not (args.quiet or args.no_progress))
    logger.info("features written to %s", out)
    return 0
