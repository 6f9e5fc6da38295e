"""``talk2dino serve``: a thin HTTP service over one `Segmenter` (needs the 'serve' extra).

The "Server" and "Limits" flags are generated from `talk2dino.server.config.ServerConfig`; a setting comes from
its flag, else ``TALK2DINO_SERVE_<FIELD>``, else the field's default.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from talk2dino.cli.flags import add_config_flags, flag_values
from talk2dino.cli.model_flags import (
    add_inference_flags,
    add_model_flags,
    build_segmenter,
    check_model_flags,
    inference_config,
)
from talk2dino.errors import Talk2DinoError
from talk2dino.server.config import ServerConfig

logger = logging.getLogger("talk2dino.cli")  # one name for the CLI's lines (see cli/segment.py)


def add_parser(sub: Any) -> None:
    """``talk2dino serve``: flags default to None so that `ServerConfig` (and its env overrides) decide."""
    serve = sub.add_parser(
        "serve", help="HTTP JSON API and web page over one model (needs the 'serve' extra)",
        description="Serve a model over HTTP: the web page at /, the JSON API at /v1 (schema at /openapi.json). "
                    "The model loads once; requests are queued and batched onto it. Every setting is also read "
                    "from TALK2DINO_SERVE_<NAME> (e.g. TALK2DINO_SERVE_PORT=9000); flags win.")
    add_model_flags(serve)
    add_inference_flags(serve)
    add_config_flags(serve, ServerConfig, title="Server")


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """`ServerConfig` from the defaults, then ``TALK2DINO_SERVE_*`` variables, then the flags.

    Raises:
        InvalidInputError: an impossible value (named with its flag).
    """
    return ServerConfig.from_env().replace(**flag_values(ServerConfig, args))


def run(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: check the settings, load the model once, then serve until interrupted."""
    config = serve_config(args)
    inference_config(args)  # the "Inference" and "Model" flags fail now, not after the model loaded
    check_model_flags(args)
    try:
        from talk2dino.server.app import create_app  # imports fastapi and uvicorn
        from talk2dino.server.http import serve
    except ImportError as err:
        raise Talk2DinoError(
            f"talk2dino serve needs the 'serve' extra: pip install 'talk2dino[serve]' ({err})") from err
    segmenter = build_segmenter(args)  # an unknown model or bad weights fail here, before the port opens
    app = create_app(segmenter, config)
    logger.info("serving %s on %s:%d (web page at /, API schema at /openapi.json)",
                segmenter.model.config.name, config.host, config.port)
    # Returns after a graceful stop on SIGTERM/SIGINT (in-flight requests finished or answered 503): exit 0.
    serve(app, log_level="warning" if args.quiet else "info")
    logger.info("server stopped")
    return 0
