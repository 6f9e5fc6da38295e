"""Exception types shared by the whole package.

Every error the library raises on purpose derives from :class:`Talk2DinoError`, so callers (the CLI, the
HTTP server) can catch one type and report its message. Messages are one actionable line: what went wrong,
with the offending value, and what to do next (house-style §11).
"""

from __future__ import annotations

__all__ = ["InvalidInputError", "Talk2DinoError", "WeightsError", "error_reason", "error_summary", "one_line"]

MAX_DETAIL_CHARS = 200
"""Longest quoted value or library reason that :func:`one_line` keeps in a message."""


class Talk2DinoError(Exception):
    """Base class of all errors raised on purpose by talk2dino.

    The message is a single actionable line, suitable for printing to stderr as is.
    """


class InvalidInputError(Talk2DinoError, ValueError):
    """A bad input: an unreadable or unsupported image, a bad label or class name, or a bad option value.

    It is also a :class:`ValueError`, so code that already catches ``ValueError`` keeps working.
    """


class WeightsError(Talk2DinoError):
    """Weights are missing, do not match their pinned hash or expected keys/shapes, or cannot be obtained."""


def one_line(value: object, max_chars: int = MAX_DETAIL_CHARS) -> str:
    """Render ``value`` (a user-supplied string, a path, a library's exception text) for an error message.

    Line breaks (Unicode ones included) and other non-printable characters are escaped, so the message stays
    one line whatever a file held, and long values are cut (a 10 MB label must not become a 10 MB message).
    """
    text = str(value)
    if not text.isprintable():
        # repr escapes control characters and Unicode line separators; its quotes are stripped so that
        # callers decide on quoting.
        text = repr(text)[1:-1]
    if len(text) > max_chars:
        text = f"{text[:max_chars]}... ({len(text):,} characters)"
    return text


def error_reason(exc: BaseException) -> str:
    """A library exception's text as a one-line reason (its type name when the text is empty), escaped and cut
    by :func:`one_line`."""
    return one_line(str(exc) or type(exc).__name__)


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut at `limit` characters: for exceptions whose text spans several
    lines (transformers, torch, safetensors) and whose type says what failed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
