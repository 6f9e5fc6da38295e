"""`ServerConfig`: the limits and address of ``talk2dino serve`` (house-style §3), one field per flag.

Every limit has a safe default here and only here; the CLI flags (``talk2dino serve --max-labels ...``) and
the environment (``TALK2DINO_SERVE_MAX_LABELS=...``) override it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from talk2dino.errors import InvalidInputError

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "TALK2DINO_SERVE_"
"""Environment variables ``TALK2DINO_SERVE_<FIELD>`` (upper case) override the defaults; flags override them."""

# A palette PNG holds 256 colours; with the background channel, 255 labels fill it (outputs.MAX_PALETTE_COLORS).
_MAX_LABELS_LIMIT = 255


@dataclass(frozen=True)
class ServerConfig:
    """Address, limits and batching of the HTTP server. All limits answer a clear 4xx/503, never exhaust memory."""

    host: str = "127.0.0.1"  # bind address; loopback by default, so nothing is exposed until asked
    port: int = 8000  # TCP port
    max_upload_bytes: int = 20_000_000  # request body cap (413 above it), checked before and while reading
    max_pixels: int = 16_000_000  # image width x height cap (413), read from the header before decoding
    max_score_values: int = 2**28  # pixels x channels cap (413): the [C, H, W] float32 scores (1 GiB per copy)
    max_labels: int = 255  # labels per request (422); 255 is the most a palette PNG holds with background
    max_label_length: int = 200  # characters per label (422)
    queue_size: int = 16  # requests admitted but not started; one more is refused with 429 + Retry-After
    request_timeout_s: float = 60.0  # admission to answer; a request waiting longer gets 503, its work is skipped
    body_timeout_s: float = 30.0  # headers to last body byte; a slower (or stalled) upload gets 408 and is closed
    shutdown_grace_s: float = 20.0  # after SIGTERM/SIGINT, in-flight requests get this long, then 503
    max_batch: int = 4  # queued requests whose images share one backbone pass
    # Images whose backbone features are kept (LRU, keyed by the upload's sha256 and the feature settings), so
    # a request changing only the labels skips the backbone; 0 turns the cache off.
    feature_cache_size: int = 8
    max_connections: int = 64  # concurrent connections before uvicorn itself answers 503
    allow_image_url: bool = False  # fetch `image_url` from the server (off: it lets clients make it fetch URLs)
    # The whole `image_url` fetch (lookups, connections, redirects, body) must finish within this, and within
    # what is left of request_timeout_s, which counts from the request's arrival and so includes the fetch.
    url_timeout_s: float = 10.0
    # Networks (CIDR) an `image_url` may point into although they are not public (loopback, private, link-local
    # ...): for images on a private network. Empty: only globally routable addresses are fetched (server/fetch.py).
    url_allow_networks: tuple[str, ...] = ()
    retry_after_s: int = 5  # Retry-After of 503 answers, and the least one of 429 answers, in seconds

    def validate(self) -> None:
        """Raise `InvalidInputError` naming the first impossible value and the flag to change."""
        checks: list[tuple[bool, str]] = [
            (0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}"),
            (self.max_upload_bytes > 0, f"--max-upload-bytes must be positive, got {self.max_upload_bytes}"),
            (self.max_pixels > 0, f"--max-pixels must be positive, got {self.max_pixels}"),
            (self.max_score_values > 0, f"--max-score-values must be positive, got {self.max_score_values}"),
            (1 <= self.max_labels <= _MAX_LABELS_LIMIT,
             f"--max-labels must be in [1, {_MAX_LABELS_LIMIT}] (a palette PNG holds 256 colours), "
             f"got {self.max_labels}"),
            (self.max_label_length > 0, f"--max-label-length must be positive, got {self.max_label_length}"),
            (self.queue_size >= 1, f"--queue-size must be >= 1, got {self.queue_size}"),
            (self.request_timeout_s > 0, f"--request-timeout must be positive, got {self.request_timeout_s}"),
            (self.body_timeout_s > 0, f"--body-timeout must be positive, got {self.body_timeout_s}"),
            (self.shutdown_grace_s >= 0, f"--shutdown-grace must be >= 0, got {self.shutdown_grace_s}"),
            (self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (0 <= self.feature_cache_size <= 1024,
             f"feature_cache_size must be in [0, 1024], got {self.feature_cache_size}"),
            (self.max_connections >= 1, f"--max-connections must be >= 1, got {self.max_connections}"),
            (self.url_timeout_s > 0, f"--url-timeout must be positive, got {self.url_timeout_s}"),
            (self.retry_after_s >= 0, f"retry_after_s must be >= 0, got {self.retry_after_s}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message)
        # Imported here: `talk2dino serve --help` builds a ServerConfig, and fetch.py pulls in ssl and http.client.
        from talk2dino.server.fetch import parse_networks

        parse_networks(self.url_allow_networks)  # a typo in a CIDR fails at start-up, in one line

    @property
    def url_fetch_limit(self) -> int:
        """How many `image_url` fetches may run at once; one more is answered 429 at once.

        Fetches run before admission (a slow URL must not hold a queue slot), so they get their own bound: half
        the queue, since each fetched image then needs a queue slot to be segmented.
        """
        return max(2, self.queue_size // 2)

    def __post_init__(self) -> None:
        # A list from argparse (--url-allow-network is repeatable) would make the frozen config unhashable.
        if not isinstance(self.url_allow_networks, tuple):
            object.__setattr__(self, "url_allow_networks", tuple(self.url_allow_networks))

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with `changes` applied (None values ignored), validated."""
        config = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        config.validate()
        return config

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Defaults overridden by ``TALK2DINO_SERVE_<FIELD>`` variables (e.g. ``TALK2DINO_SERVE_PORT=9000``).

        Raises:
            InvalidInputError: a value that does not parse as the field's type, or an impossible value.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            name = ENV_PREFIX + item.name.upper()
            if name not in env:
                continue
            raw = env[name].strip()
            kind = type(getattr(cls(), item.name))
            try:
                if kind is bool:
                    lowered = raw.lower()
                    if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    changes[item.name] = lowered in ("1", "true", "yes", "on")
                elif kind is tuple:  # a comma-separated list, e.g. TALK2DINO_SERVE_URL_ALLOW_NETWORKS=10.0.0.0/8
                    changes[item.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
                else:
                    changes[item.name] = kind(raw)
            except ValueError as err:
                raise InvalidInputError(f"{name}={raw!r} is not a valid {kind.__name__}") from err
        return cls().replace(**changes)
