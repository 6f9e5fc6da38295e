"""``talk2dino models``: the registered model names and descriptions (pure data: no torch, no transformers)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    """``talk2dino models``."""
    sub.add_parser("models", help="list the registered models")


def run(args: argparse.Namespace) -> int:
    """The ``models`` subcommand: print registered names and descriptions to stdout."""
    from talk2dino.catalog import describe_models

    for name, description in describe_models().items():
        sys.stdout.write(f"{name}\t{description}\n")
    return 0
