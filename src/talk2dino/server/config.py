"""`ServerConfig`: the limits and address of ``talk2dino serve`` (house-style §3), one field per flag.

Every limit has a safe default here and only here. The ``serve`` flags are generated from these fields
(`talk2dino.cli.flags`; the help, the group and a different spelling are the field's metadata, e.g.
``request_timeout_s`` is ``--request-timeout``), and the environment (``TALK2DINO_SERVE_MAX_LABELS=...``) is read
with the same parser (`talk2dino.settings.read_env`); flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from talk2dino.errors import InvalidInputError
from talk2dino.settings import meta, read_env

__all__ = ["ENV_PREFIX", "ServerConfig"]

ENV_PREFIX = "TALK2DINO_SERVE_"
"""Environment variables ``TALK2DINO_SERVE_<FIELD>`` (upper case) override the defaults; flags override them."""

# A palette PNG holds 256 colours; with the background channel, 255 labels fill it (render.MAX_PALETTE_COLORS).
_MAX_LABELS_LIMIT = 255
_SERVER = "Server"
_LIMITS = "Limits (a request over one gets a 4xx/503 answer)"


@dataclass(frozen=True)
class ServerConfig:
    """Address, limits and batching of the HTTP server. All limits answer a clear 4xx/503, never exhaust memory."""

    host: str = field(default="127.0.0.1", metadata=meta(
        group=_SERVER, help="bind address; 0.0.0.0 exposes it to the network"))
    port: int = field(default=8000, metadata=meta(group=_SERVER, help="TCP port"))
    max_upload_bytes: int = field(default=20_000_000, metadata=meta(
        group=_LIMITS, help="request body cap (413 above it)"))
    max_pixels: int = field(default=16_000_000, metadata=meta(
        group=_LIMITS, help="image width x height cap (413), from the header"))
    # 2**28 values of the [C, H, W] float32 scores are 1 GiB per copy.
    max_score_values: int = field(default=2**28, metadata=meta(
        group=_LIMITS, help="image pixels x score channels cap (413)"))
    max_labels: int = field(default=255, metadata=meta(
        group=_LIMITS, help="labels per request (422), at most 255 (a palette PNG)"))
    max_label_length: int = field(default=200, metadata=meta(group=_LIMITS, help="characters per label (422)"))
    queue_size: int = field(default=16, metadata=meta(
        group=_LIMITS, help="requests waiting for the model before answering 429"))
    request_timeout_s: float = field(default=60.0, metadata=meta(
        flag="--request-timeout", group=_LIMITS, help="seconds from arrival to answer, then 503"))
    body_timeout_s: float = field(default=30.0, metadata=meta(
        flag="--body-timeout", group=_LIMITS, help="seconds to receive a request body, then 408"))
    shutdown_grace_s: float = field(default=20.0, metadata=meta(
        flag="--shutdown-grace", group=_LIMITS, help="seconds in-flight requests get after SIGTERM"))
    max_batch: int = field(default=4, metadata=meta(
        group=_LIMITS, help="queued requests whose images share one backbone pass"))
    # Kept LRU, keyed by the upload's sha256 and the feature settings.
    feature_cache_size: int = field(default=8, metadata=meta(group=_LIMITS, help=(
        "images whose features are kept, so a labels-only change skips the backbone (0: off)")))
    max_connections: int = field(default=64, metadata=meta(
        group=_SERVER, help="concurrent connections before answering 503"))
    allow_image_url: bool = field(default=False, metadata=meta(group=_LIMITS, help=(
        "let clients send image_url for the server to fetch (off: it fetches nothing, as it lets clients make it "
        "fetch URLs)")))
    url_timeout_s: float = field(default=10.0, metadata=meta(flag="--url-timeout", group=_LIMITS, help=(
        "seconds for a whole image_url fetch (lookups, connections, redirects, body), also within --request-timeout, "
        "which counts from the request's arrival and so includes the fetch")))
    url_allow_networks: tuple[str, ...] = field(default=(), metadata=meta(
        flag="--url-allow-network", repeat=True, metavar="CIDR", group=_LIMITS, help=(
            "let image_url reach this non-public network too (loopback, private, link-local ...), e.g. 10.0.0.0/8 "
            "for a private image store (repeatable; default: only globally routable addresses, server/fetch.py)")))
    retry_after_s: int = field(default=5, metadata=meta(
        flag="--retry-after", group=_LIMITS, help="Retry-After of 503 answers, and the least of 429 ones"))

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
        """Defaults overridden by ``TALK2DINO_SERVE_<FIELD>`` variables (e.g. ``TALK2DINO_SERVE_PORT=9000``), read by
        `talk2dino.settings.parse_text` (a tuple is a comma-separated list; a boolean 1/0, true/false, yes/no, on/off).

        Raises:
            InvalidInputError: a value that does not parse as the field's type, or an impossible value.
        """
        return cls().replace(**read_env(cls, ENV_PREFIX, os.environ if environ is None else environ))
