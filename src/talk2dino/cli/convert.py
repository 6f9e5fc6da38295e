"""``talk2dino convert``: benchmark label maps into the layout ``eval`` reads (loads no model)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from talk2dino.errors import InvalidInputError

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)


def add_parser(sub: Any) -> None:
    """``talk2dino convert KIND SOURCE``."""
    conv = sub.add_parser("convert", help="prepare benchmark label maps (COCO-Object/Stuff, Cityscapes, Context)")
    conv.add_argument("kind", choices=["coco-object", "coco-stuff", "cityscapes", "context"])
    conv.add_argument("source", help="raw maps folder (COCO stuffthingmaps), gtFine folder (Cityscapes), or the "
                                     "459-class annotation folder (Context)")
    conv.add_argument("--out", default=None, help="output folder (COCO; default: next to the raw maps)")
    conv.add_argument("--labels-file", default=None, help="Context: the official labels.txt of the 459 classes")
    conv.add_argument("--voc2010", default=None, help="Context: the VOCdevkit/VOC2010 folder to write into")
    conv.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")


def run(args: argparse.Namespace) -> int:
    """The ``convert`` subcommand: prepare label maps in the layout `eval` reads."""
    from talk2dino.data import convert_folders, converters

    if args.kind == "coco-object":
        counts = convert_folders.convert_coco_object(args.source, args.out, overwrite=args.overwrite)
    elif args.kind == "coco-stuff":
        counts = convert_folders.convert_coco_stuff(args.source, args.out, overwrite=args.overwrite)
    elif args.kind == "cityscapes":
        counts = convert_folders.convert_cityscapes(args.source, overwrite=args.overwrite)
    else:
        if not args.labels_file or not args.voc2010:
            raise InvalidInputError(f"context needs --labels-file and --voc2010; {converters.CONTEXT_SOURCES_HELP}")
        counts = convert_folders.convert_context(args.source, args.labels_file, args.voc2010, overwrite=args.overwrite)
    logger.info("%s: %s", args.kind, counts.describe())
    return 0
