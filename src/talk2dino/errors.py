"""Exception types shared by the whole package.

Every error the library raises on purpose derives from :class:`Talk2DinoError`, so callers (the CLI, the
HTTP server) can catch one type and report its message. Messages are one actionable line: what went wrong,
with the offending value, and what to do next (house-style §11).
"""

from __future__ import annotations

__all__ = ["InvalidInputError", "Talk2DinoError", "WeightsError"]


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
