"""The ``talk2dino`` command (house-style §6): the parser, logging, exit codes and `main`.

``main(argv)`` is callable in-process; tests do that. Each subcommand is one module of this package with
``add_parser(sub)`` and ``run(args) -> int`` (`COMMANDS`); `main` parses, configures logging, runs the command and
turns its failure into an exit code.

Exit codes: 0 every image succeeded (``serve``: stopped cleanly); 1 some images failed (the others are
written); 2 the command could not start (bad arguments, labels, limits, model or weights, missing extra);
3 the run stopped on an internal failure that is no image's fault (a bug, an unsupported torch or
transformers version, or the device out of memory), reported as one line naming the exception and the
installed versions (``-v`` adds the traceback); 130 interrupted.

Only input errors (``errors.is_input_error``: an unreadable, corrupt or oversized image) fail one image and let
the others go on; any other failure stops the run at its first occurrence (issue 12).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from talk2dino.cli import convert, export, extract, models, segment, segment_dataset, serve, train
from talk2dino.cli import eval as eval_command
from talk2dino.cli.flags import DEPRECATED_DEST

logger = logging.getLogger("talk2dino.cli")

# Subcommand -> its module, in the order of the help. Building the parser imports these modules only: each
# imports what its run needs when it runs.
COMMANDS: dict[str, ModuleType] = {
    "segment": segment, "segment-dataset": segment_dataset,
    "extract": extract, "train": train, "serve": serve, "eval": eval_command,
    "convert": convert, "export-onnx": export, "models": models,
}

# Commands that load no model. They do not import transformers (over a second) or torch, so they start fast
# (benchmarks/bench_startup.py, tests/test_startup.py); None: no command, the help.
MODEL_FREE_COMMANDS = (None, "models", "convert")


def build_parser() -> argparse.ArgumentParser:
    """The parser behind ``talk2dino`` (its help is the documentation the README quotes)."""
    parser = argparse.ArgumentParser(prog="talk2dino",
                                     description="Open-vocabulary semantic segmentation with Talk2DINO.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bar")
    sub = parser.add_subparsers(dest="command")
    for module in COMMANDS.values():
        module.add_parser(sub)
    for command_parser in sub.choices.values():
        _add_verbosity_args(command_parser)
    return parser


def _add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    """-v/-q after the subcommand too (``talk2dino segment x.jpg -v``). SUPPRESS: when not given there, the
    value parsed before the subcommand stands (argparse copies only what the subparser set)."""
    verbosity = parser.add_argument_group("Logging").add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="errors only, no progress bar")


def _configure_logging(verbose: bool, quiet: bool, command: str | None) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not verbose:
        # Third-party INFO chatter (hub downloads, weight loading) is noise for a CLI user.
        for name in ("transformers", "huggingface_hub", "urllib3", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if command in MODEL_FREE_COMMANDS:
            return
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # transformers missing is reported later, by create_model
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting (so tests can call it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from talk2dino import __version__

        sys.stdout.write(f"talk2dino {__version__}\n")
        return 0
    _configure_logging(args.verbose, args.quiet, args.command)
    for message in getattr(args, DEPRECATED_DEST, None) or ():  # old flag spellings (talk2dino.cli.flags)
        logger.warning("%s", message)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from talk2dino.errors import InternalError, Talk2DinoError, internal_error_message, one_line

    try:
        return int(COMMANDS[args.command].run(args))
    except InternalError as err:  # a run stopped on a failure that is no input's fault (issue 12)
        logger.debug("traceback of the internal error", exc_info=err.__cause__ or err)
        logger.error("%s", err)
        return 3
    except (Talk2DinoError, ValueError) as err:
        logger.error("%s", err)
        return 2
    except ImportError as err:
        # An optional extra that is not installed (onnxruntime, fastapi, ...): the command cannot start, and
        # the message (ours where we import it, names the extra) is the whole story.
        logger.error("%s", one_line(err))
        return 2
    except Exception as err:  # an unexpected failure outside the guarded loops: one line too, not a traceback
        if isinstance(err, OSError):
            raise  # a file or system problem (permissions, a full disk), not a bug to report
        logger.debug("traceback of the internal error", exc_info=err)
        logger.error("%s", internal_error_message(err))
        return 3
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
