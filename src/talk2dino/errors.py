"""Exception types shared by the whole package.

Every error the library raises on purpose derives from :class:`Talk2DinoError`, so callers (the CLI, the
HTTP server) can catch one type and report its message. Messages are one actionable line: what went wrong,
with the offending value, and what to do next (house-style §11).

Loops over inputs (the CLI's images, the server's requests, evaluation samples) decide here what one input
may fail alone and what must stop the run (issue 12): :func:`is_input_error` is true for
:class:`InvalidInputError` only (the loaders wrap every decoder error in it), which is reported for that
input while the others go on. Any other failure (a bug, an unsupported torch or transformers version, the
device out of memory) would fail every input alike, so :func:`internal_error_guard` turns it into one
:class:`InternalError` whose message (:func:`internal_error_message`) says so, and the run stops there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "InternalError",
    "InvalidInputError",
    "Talk2DinoError",
    "WeightsError",
    "error_reason",
    "error_summary",
    "internal_error_guard",
    "internal_error_message",
    "is_input_error",
    "is_out_of_memory",
    "one_line",
]

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


class InternalError(Talk2DinoError):
    """A failure that is not the input's fault: a bug, an unsupported torch/transformers version, or the device
    out of memory. It would fail every input alike, so loops over inputs stop at the first one instead of
    reporting each input as bad. The message is :func:`internal_error_message`'s one line.
    """


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


DEFAULT_MEMORY_HINT = "try a smaller --batch-size (or --window-batch-size)"
"""What :func:`internal_error_message` suggests after an out-of-memory error, unless the caller names its own
options (the server does)."""

DEFAULT_TRACEBACK_HINT = "rerun with -v for the traceback"
"""Where :func:`internal_error_message` says the traceback is (the CLI's wording; the server names its log)."""

_REPORTED_PACKAGES = ("talk2dino", "torch", "transformers")


def is_input_error(exc: BaseException) -> bool:
    """Whether `exc` is the fault of one input (an image, a label, an option), so that a loop over inputs
    reports it for that input and goes on with the others.

    Only :class:`InvalidInputError` (and its subclasses) is: the image loaders wrap every decoder error
    (``talk2dino.data.images.DECODE_ERRORS``) in it, so a raw ``OSError`` or ``ValueError`` reaching a loop
    comes from somewhere else (the model, a library) and would fail every input alike.
    """
    return isinstance(exc, InvalidInputError)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device (or the host) ran out of memory: ``torch.OutOfMemoryError`` (checked by
    name, so torch is not imported here), ``MemoryError``, or a ``RuntimeError`` whose text says so."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] == "torch"
           for cls in type(exc).__mro__):
        return True
    text = str(exc).lower()
    # "CUDA out of memory", "MPS backend out of memory", and the CPU allocator's "can't allocate memory".
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _installed_versions() -> str:
    """``talk2dino 0.1.0, torch 2.13.0, transformers 5.25.0`` from the package metadata (nothing imported)."""
    from talk2dino.compat import installed_version  # compat imports this module: resolved at call time

    return ", ".join(f"{name} {installed_version(name) or 'not installed'}" for name in _REPORTED_PACKAGES)


def _failure_summary(exc: BaseException) -> str:
    """``Type: first line`` of `exc`, one line; for an exception re-raised by a torch DataLoader from a worker
    process (whose text is ``Caught X in DataLoader worker process N`` and the worker's traceback), the
    traceback's last line, which names the original exception and its message."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return one_line(lines[-1], max_chars=300)
    return one_line(error_summary(exc), max_chars=300)


def internal_error_message(exc: BaseException, *, memory_hint: str = DEFAULT_MEMORY_HINT,
                           traceback_hint: str = DEFAULT_TRACEBACK_HINT) -> str:
    """One line for a failure that is not the input's fault.

    Out of memory (see :func:`is_out_of_memory`) says so and suggests `memory_hint`. Anything else says it is
    an internal or version problem, gives the exception's type and first line and the installed talk2dino,
    torch and transformers versions, and asks for a report. An :class:`InternalError` keeps its message.

    Example::

        internal error, not a problem with the input: AttributeError: 'Dinov2WithRegistersAttention' object
        has no attribute 'q_proj' (talk2dino 0.1.0, torch 2.13.0, transformers 5.25.0); this is a bug or an
        unsupported torch/transformers version: please report this line (rerun with -v for the traceback)

    (one line in reality).
    """
    if isinstance(exc, InternalError):
        return one_line(str(exc), max_chars=1000)
    summary = _failure_summary(exc)
    if is_out_of_memory(exc):
        return f"out of memory, not a problem with the input: {summary}; {memory_hint}"
    return (f"internal error, not a problem with the input: {summary} ({_installed_versions()}); this is a bug "
            f"or an unsupported torch/transformers version: please report this line ({traceback_hint})")


@contextlib.contextmanager
def internal_error_guard(*, memory_hint: str = DEFAULT_MEMORY_HINT,
                         traceback_hint: str = DEFAULT_TRACEBACK_HINT) -> Iterator[None]:
    """Around a loop over inputs: let :class:`Talk2DinoError` through (input errors the loop did not catch,
    weights or output errors with their own message), and turn anything else into an :class:`InternalError`
    carrying :func:`internal_error_message` (chained to the original, whose traceback stays available).

    ``KeyboardInterrupt`` and other ``BaseException`` that are not ``Exception`` pass unchanged.
    """
    try:
        yield
    except Talk2DinoError:
        raise
    except Exception as exc:
        raise InternalError(internal_error_message(exc, memory_hint=memory_hint,
                                                   traceback_hint=traceback_hint)) from exc
