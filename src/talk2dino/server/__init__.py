"""``talk2dino serve``: a thin HTTP service and web page over `Segmenter` (extra: ``serve``).

The library never imports this package (house-style §2); it only uses the public API (`create_model`,
`Segmenter`) and the shared writers of `talk2dino.outputs`. ``create_app`` needs FastAPI, so it loads on
first use: ``from talk2dino.server import ServerConfig`` works without the extra installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from talk2dino.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]

if TYPE_CHECKING:
    from talk2dino.server.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from talk2dino.server.app import create_app

        return create_app
    raise AttributeError(f"module 'talk2dino.server' has no attribute {name!r}")
