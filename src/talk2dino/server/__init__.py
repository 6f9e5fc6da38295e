"""``talk2dino serve``: a thin HTTP service and web page over `Segmenter` (extra: ``serve``).

The library never imports this package (house-style §2); it only uses the public API (`create_model`,
`Segmenter`) and the shared writers of `talk2dino.render`. ``create_app`` and ``serve`` need FastAPI and
uvicorn, so they load on first use: ``from talk2dino.server import ServerConfig`` works without the extra.

Modules: `app` (create_app and the routes), `schemas` (answer models, OpenAPI), `http` (body limits, error
answers, `serve` and its graceful stop), `formtext` (UTF-8 form fields), `uploads` (the request's image,
labels and options), `worker` (the thread that owns the segmenter), `answers` (the JSON answers), `fetch`
(``image_url``), `config` (`ServerConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from talk2dino.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]

if TYPE_CHECKING:
    from talk2dino.server.app import create_app
    from talk2dino.server.http import serve


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from talk2dino.server.app import create_app

        return create_app
    if name == "serve":
        from talk2dino.server.http import serve

        return serve
    raise AttributeError(f"module 'talk2dino.server' has no attribute {name!r}")
