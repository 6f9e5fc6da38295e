"""``talk2dino export-onnx``: the image side, text side and psi of a model as ONNX files."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from talk2dino.cli.model_flags import add_model_flags, check_model_flags, create_model_from_args

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)


def add_parser(sub: Any) -> None:
    """``talk2dino export-onnx``: the "Model" flags (torch only), --out, --image-size, --opset."""
    onnx = sub.add_parser("export-onnx", help="export the image side, text side and psi to ONNX",
                          description="Writes image_encoder.onnx, text_encoder.onnx, projection.onnx, the "
                                      "tokenizer and onnx_config.json (hashes); run them with --runtime onnx.")
    add_model_flags(onnx, runtime=False)
    onnx.add_argument("--out", required=True, help="output folder")
    onnx.add_argument("--image-size", type=int, default=None, help="window size (default: the model's, 448)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")


def run(args: argparse.Namespace) -> int:
    """The ``export-onnx`` subcommand."""
    from talk2dino.onnx.export import export_onnx

    check_model_flags(args)
    paths = export_onnx(create_model_from_args(args), args.out, image_size=args.image_size, opset=args.opset)
    logger.info("exported %s", ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0
