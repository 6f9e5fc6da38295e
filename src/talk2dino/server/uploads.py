"""What a request sends, read and checked against the server's limits: the image, the labels, the options.

The image is decoded once, from memory: an upload straight from the file object the web framework spooled
(in memory, or on disk past its threshold), an ``image_url`` from the fetched bytes. No temporary file is
written and the header is read once, by `talk2dino.data.images.load_image`, which also runs the server's
size checks (``--max-pixels``, ``--max-score-values``) before any pixel is decoded. The sha256 of the bytes is
the worker's feature-cache key.

Labels: a comma-separated string (`talk2dino.labels.split_labels`, the parser of ``talk2dino segment
--labels``) or a JSON list of strings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from typing import BinaryIO, TypeVar

import anyio
import numpy as np
from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from talk2dino.config import check_template
from talk2dino.data.images import MAX_IMAGE_PIXELS, HeaderCheck, ImageTooLargeError, load_image
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.labels import split_labels
from talk2dino.server.config import ServerConfig
from talk2dino.server.fetch import FetchTooLargeError, fetch_image_url
from talk2dino.server.http import Drain, PayloadTooLargeError
from talk2dino.server.schemas import DEPRECATED_FORM_FIELDS
from talk2dino.server.worker import QueueFullError

__all__ = [
    "DECODE_CONCURRENCY",
    "MAX_TEMPLATES",
    "check_label_limits",
    "check_templates",
    "check_url_text",
    "decode_image",
    "fetch_url",
    "max_json_labels_chars",
    "parse_labels",
    "renamed_option",
    "size_check",
]

logger = logging.getLogger(__name__)

# Decoding runs off the event loop; two at a time is enough to overlap with the network on 2 cores without
# letting a burst of large uploads decode (and hold pixels) all at once.
DECODE_CONCURRENCY = 2
MAX_TEMPLATES = 64
_HASH_CHUNK = 1 << 20

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- labels, options
def parse_labels(text: str, *, max_json_chars: int | None = None) -> list[str]:
    """Labels from a form field: a JSON list of strings (``["a, b", "c"]``) or a comma-separated string.

    Comma-separated entries are trimmed, and ``"..."`` quotes one that holds commas; an empty entry is an
    error, as in ``talk2dino segment --labels`` (`talk2dino.labels.split_labels`).
    A JSON list longer than `max_json_chars` is refused before parsing (the server passes a bound from its
    label limits), and deep nesting or huge numbers are refused, never raised as RecursionError/ValueError.

    Raises:
        InvalidInputError: malformed, oversized or too deeply nested JSON, a non-string entry, or an empty entry.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        if max_json_chars is not None and len(stripped) > max_json_chars:
            raise InvalidInputError(f"labels: a JSON list of {len(stripped):,} characters is longer than this "
                                    f"server accepts ({max_json_chars:,}, from --max-labels and --max-label-length)")
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"labels look like a JSON list but do not parse ({err.msg})") from err
        except RecursionError:
            raise InvalidInputError("labels: JSON list is nested too deeply; send a flat list of strings") from None
        except ValueError as err:  # e.g. an integer past Python's digit limit
            raise InvalidInputError(f"labels: JSON list does not parse ({one_line(str(err))[:120]})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInputError("labels as JSON must be a list of strings")
        return value
    # As `talk2dino segment --labels`: '"cat, dog", bird' is two labels, not '"cat' and 'dog"'.
    return split_labels(text, what="labels")


def max_json_labels_chars(config: ServerConfig) -> int:
    """The longest JSON label list that can hold `max_labels` labels of `max_label_length` characters, each
    character escaped (``\\uXXXX``, 6 characters) and separated by ``", "`` (a generous bound, not a limit)."""
    return 2 + config.max_labels * (6 * config.max_label_length + 8)


def check_label_limits(names: list[str], config: ServerConfig, what: str = "labels") -> None:
    """422 when there are more than ``--max-labels`` names or one is longer than ``--max-label-length``."""
    if len(names) > config.max_labels:
        raise StarletteHTTPException(422, f"{len(names)} {what} given; this server accepts at most "
                                          f"{config.max_labels} (--max-labels)")
    for name in names:
        if len(name) > config.max_label_length:
            raise StarletteHTTPException(422, f"a {what[:-1]} of {len(name)} characters ({name[:40]!r}...) is "
                                              f"longer than this server's limit of {config.max_label_length} "
                                              "(--max-label-length)")


def check_templates(templates: list[str], config: ServerConfig) -> None:
    """422 over `MAX_TEMPLATES` templates or the label limits; 400 for a template without one bare ``{}``."""
    if len(templates) > MAX_TEMPLATES:
        raise StarletteHTTPException(422, f"{len(templates)} templates given; at most {MAX_TEMPLATES}")
    check_label_limits(templates, config, what="templates")
    for template in templates:
        check_template(template)


def renamed_option(new_name: str, new: T | None, old: T | None, *, warned: set[str]) -> T | None:
    """The value of a form option sent under its name `new_name` or under its deprecated alias.

    The alias is the key of `DEPRECATED_FORM_FIELDS` that maps to `new_name`. Using it logs a warning, once
    per alias for the names in `warned` (the app's set). Both names may be sent (a client talking to old and
    new servers alike) as long as they agree.

    Raises:
        InvalidInputError: both names were sent with different values.
    """
    if old is None:
        return new
    old_name = next(k for k, v in DEPRECATED_FORM_FIELDS.items() if v == new_name)
    if old_name not in warned:
        warned.add(old_name)
        logger.warning("a client sent the form field %r, deprecated: it is now %r; the old name is accepted "
                       "until the next release (docs/serve.md)", old_name, new_name)
    if new is not None and new != old:
        raise InvalidInputError(f"{new_name}={new} and its deprecated alias {old_name}={old} disagree; "
                                f"send {new_name} only")
    return old


# ---------------------------------------------------------------------------------------------- the image
def check_url_text(url: str) -> None:
    """Refuse an image_url that no HTTP request line can carry (whitespace, control characters) before fetching."""
    if len(url) > 8192 or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidInputError(f"image_url must be a URL without spaces or control characters; got "
                                f"{one_line(url, 100)!r} (percent-encode them, e.g. %20 for a space)")


def size_check(config: ServerConfig, channels: int) -> HeaderCheck:
    """The server's size limits as a `load_image` header check: 413 (`ImageTooLargeError`) over either."""

    def check(width: int, height: int, mode: str) -> None:
        pixels = width * height
        if pixels > config.max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} ({pixels:,} pixels), above this server's limit of "
                f"{config.max_pixels:,} (--max-pixels); send a smaller image")
        if pixels * channels > config.max_score_values:
            raise ImageTooLargeError(
                f"a {width}x{height} image with {channels} score channels needs {pixels * channels:,} "
                f"score values, above this server's limit of {config.max_score_values:,} (--max-score-values); "
                "send a smaller image or fewer labels")

    return check


def decode_image(source: bytes | BinaryIO, name: str, *, config: ServerConfig,
                 channels: int) -> tuple[np.ndarray, str]:
    """Decode an uploaded image from memory (or the framework's spooled file), after the server's size checks.

    Args:
        source: the image's bytes (a fetched ``image_url``) or the upload's binary file object (read from its
            start; it is not copied).
        name: how the image is called in error messages (the upload's file name).
        config: the server's limits.
        channels: score channels the request asks for (labels, plus one with background).

    Returns:
        ``([H, W, 3]`` uint8 RGB, hex sha256 of the bytes``)``; the hash is the feature cache's key.

    Raises:
        PayloadTooLargeError: over ``--max-pixels`` or ``--max-score-values``, or a decompression bomb (413).
        InvalidInputError: not a decodable image (400).
    """
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        source.seek(0)
        for chunk in iter(lambda: source.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    try:
        # The server's own limits are checked by `size_check`, with their flag names; load_image's max_pixels
        # is only the library's backstop (Pillow refuses far larger images anyway).
        rgb = load_image(source, name=name, max_pixels=max(config.max_pixels, MAX_IMAGE_PIXELS),
                         check_header=size_check(config, channels))
    except ImageTooLargeError as err:
        raise PayloadTooLargeError(str(err)) from None
    return rgb, digest.hexdigest()


async def fetch_url(request: Request, url: str, config: ServerConfig, started: float) -> bytes:
    """Fetch an ``image_url`` (server/fetch.py: public addresses only, one deadline, a byte cap) off the loop.

    It runs before admission, so a slow or stalled URL never holds a queue slot that uploads need; fetches have
    their own bound (`ServerConfig.url_fetch_limit`), and when all are busy the answer is 429 at once rather
    than a wait. The deadline is the request's (``--request-timeout`` counts from arrival, so it includes the
    fetch) and at most ``--url-timeout`` for the fetch itself.

    Raises:
        QueueFullError: `url_fetch_limit` fetches are in progress (429).
        FetchError: the one generic 400 of every fetch failure (the reason is logged).
        PayloadTooLargeError: the content is over ``--max-upload-bytes`` (413).
    """
    state = request.app.state
    limiter: anyio.CapacityLimiter | None = getattr(state, "url_fetch_limiter", None)
    if limiter is None:  # made on first use, on the event loop thread (no await in between: no race)
        limiter = state.url_fetch_limiter = anyio.CapacityLimiter(config.url_fetch_limit)
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        raise QueueFullError(f"the server is busy: {config.url_fetch_limit} image_url fetches are already in "
                             "progress; retry after the Retry-After seconds, or upload the image as 'image'") from None
    deadline = min(started + config.request_timeout_s, time.monotonic() + config.url_timeout_s)
    drain: Drain | None = getattr(state, "drain", None)
    if drain is not None and drain.deadline is not None:  # shutting down: no fetch outlives the grace period
        deadline = min(deadline, drain.deadline)
    try:
        return await anyio.to_thread.run_sync(functools.partial(
            fetch_image_url, url, max_bytes=config.max_upload_bytes, deadline=deadline,
            allowed_networks=config.url_allow_networks))
    except FetchTooLargeError as err:
        raise PayloadTooLargeError(str(err)) from None
    finally:
        limiter.release()
