"""A vocabulary checked once: the label rules of method.md §4.2 (P25) and the token-level checks against a text encoder.

- :func:`check_labels` -> :class:`CheckedLabels`: the text rules (non-empty, no control characters, no duplicates,
  no two labels the text encoder cannot tell apart, ...). A `CheckedLabels` is not checked again by
  `Segmenter.set_classes`, and it remembers whether a label is named 'background', so a per-call
  ``background=True`` needs no second pass over the names.
- :func:`refuse_same_tokens`: two labels whose prompts are the same tokens (the exact test behind the text rules).
- :func:`report_truncated`: one warning per label whose prompts were cut to the text encoder's context.

The single-label text helpers (canonical form, comma splitting) live in the light `talk2dino.labels`.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from talk2dino.errors import InvalidInputError, one_line
from talk2dino.labels import BACKGROUND_NAME, canonical_label, label_text_problem

logger = logging.getLogger(__name__)

MAX_LABEL_CHARS = 1000
"""Longest accepted label, in characters (CLIP keeps 77 tokens, far fewer characters than this)."""
# Unicode categories refused in labels: controls (NUL, tab, CR, LF, ...) and line/paragraph separators.
_BAD_LABEL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
BACKGROUND_CLASH = "label 'background' clashes with the background channel; remove it or turn background off"
"""The message when a label is named like the background channel while that channel is on."""


class CheckedLabels(list[str]):
    """Labels that passed :func:`check_labels`, in order and verbatim (a ``list`` of ``str``).

    Attributes:
        background_label: 1-based index of the label whose canonical form is ``'background'``, or None; such a
            label is refused when the background channel is on (checked per call, without re-reading the names).
    """

    def __init__(self, names: Iterable[str], *, background_label: int | None = None) -> None:
        super().__init__(names)
        self.background_label = background_label
        self._snapshot = tuple(self)

    def unchanged(self) -> bool:
        """Whether the list still holds exactly the checked labels (it is a list: a caller could edit it)."""
        return tuple(self) == self._snapshot

    def check_background(self, background: bool) -> None:
        """Raise when the background channel is on and a label is named like it.

        Raises:
            InvalidInputError: `background` is on and :attr:`background_label` is set.
        """
        if background and self.background_label is not None:
            raise InvalidInputError(BACKGROUND_CLASH)


def check_labels(names: Sequence[str], *, background: bool = False) -> CheckedLabels:
    """Validate a vocabulary; names are kept verbatim (method.md §4.2, P25). Checks once: a `CheckedLabels`
    that is unchanged is only checked against `background`.

    Args:
        names: the labels, in class order.
        background: the background channel is on, so a label named like it is refused now.

    Returns:
        The labels as a `CheckedLabels`.

    Raises:
        InvalidInputError: empty vocabulary, a non-string, empty or whitespace-only label, a label longer
            than :data:`MAX_LABEL_CHARS` or holding a control character or line break (NUL, tab, CR, LF,
            U+2028 ...), text that is not text (a lone surrogate, U+FFFD) or CLIP's special token text, a
            duplicate, two labels the text encoder cannot tell apart (the same after Unicode NFC, whitespace
            collapsing and lower-casing: `talk2dino.labels.canonical_label`), or 'background' while the
            background channel is on. The message is one line and quotes the label (escaped and shortened).
    """
    if isinstance(names, CheckedLabels) and names.unchanged():
        names.check_background(background)
        return names
    if isinstance(names, str):
        raise InvalidInputError("labels must be a list of strings, not one string; split it first")
    names = list(names)
    if not names:
        raise InvalidInputError("no labels given")
    seen: set[str] = set()
    same: dict[str, int] = {}  # canonical form -> 1-based index of its first label
    background_label = None
    for index, name in enumerate(names, start=1):
        if not isinstance(name, str):
            raise InvalidInputError(f"label {index} ({one_line(repr(name))}) is not a string")
        shown = one_line(repr(name))
        # Format characters (zero-width space, byte-order mark ...) are invisible: a label of only those
        # and whitespace names nothing.
        if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in name):
            raise InvalidInputError(f"label {index} {shown} is empty or only whitespace")
        if len(name) > MAX_LABEL_CHARS:
            # The text encoder keeps 77 tokens anyway; a huge label only costs tokenizer time and memory.
            raise InvalidInputError(
                f"label {index} {shown} is {len(name):,} characters long; the limit is {MAX_LABEL_CHARS:,}"
            )
        # A control character or line break in a label is a parsing mistake upstream (a binary file, a
        # missed split), never a class name; refuse it instead of embedding garbage.
        bad = next((ch for ch in name if unicodedata.category(ch) in _BAD_LABEL_CATEGORIES), None)
        if bad is not None:
            raise InvalidInputError(f"label {index} {shown} contains the control character U+{ord(bad):04X}; remove it")
        problem = label_text_problem(name)
        if problem is not None:
            raise InvalidInputError(f"label {index} {shown} {problem}")
        if name in seen:
            raise InvalidInputError(f"duplicate label {shown} (label {index})")
        canonical = canonical_label(name)
        if canonical == BACKGROUND_NAME:
            if background:
                raise InvalidInputError(BACKGROUND_CLASH)
            background_label = index
        if canonical in same:
            # The CLIP tokenizer normalises exactly this away: both labels get bit-identical embeddings and
            # the later one could never win a pixel (issue 14).
            first = same[canonical]
            # Labels that differ only in Unicode normalisation (NFC/NFD) print alike: show their code points.
            alike = unicodedata.normalize("NFC", names[first - 1]) == unicodedata.normalize("NFC", name)
            quote = ascii if alike else repr
            raise InvalidInputError(
                f"labels {first} {one_line(quote(names[first - 1]), 60)} and {index} "
                f"{one_line(quote(name), 60)} are the same label to the text encoder (it ignores case, "
                "repeated spaces and Unicode normalisation); keep one of them")
        seen.add(name)
        same[canonical] = index
    return CheckedLabels(names, background_label=background_label)


def refuse_same_tokens(encoder: Any, names: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse two labels whose prompts are the same tokens in every template, up to the end-of-text token.

    Their embeddings would be bit-identical and the later label could never win a pixel (issue 14).
    :func:`check_labels` already refuses what the tokenizer's normaliser merges (case, whitespace, NFC); this is
    the exact test behind it: punctuation splitting (``cat.`` and ``cat .``), and labels that only differ
    after the context's last token (the prompt is cut there).

    Args:
        encoder: the text encoder; one without a ``tokenize`` method is not checked.
        names: the checked labels.
        templates: the prompt templates, each with one ``{}``.

    Raises:
        InvalidInputError: one line naming both labels.
    """
    if len(names) < 2 or not callable(getattr(encoder, "tokenize", None)):
        return
    from talk2dino.models.text_encoder import collect_truncations

    prompts = [t.format(name) for name in names for t in templates]
    with collect_truncations():  # cut prompts are reported once, by the embedding that follows
        ids, mask = encoder.tokenize(prompts)
    eot = getattr(encoder, "eot_id", None)
    context = getattr(encoder, "context_length", None)
    rows = [row[:int(n)] for row, n in zip(ids.tolist(), mask.sum(dim=1).tolist(), strict=True)]
    if eot is not None:
        # CLIP pools the first end-of-text token under causal attention: whatever follows it is never seen.
        rows = [row[:row.index(eot) + 1] if eot in row else row for row in rows]
    first_of: dict[tuple[tuple[int, ...], ...], int] = {}
    count = len(templates)
    for index in range(len(names)):
        key = tuple(tuple(row) for row in rows[index * count:(index + 1) * count])
        first = first_of.setdefault(key, index)
        if first != index:
            cut = context is not None and any(len(row) >= context for row in key)
            why = (f"their prompts are cut at the {context}-token context" if cut
                   else "the tokenizer splits their punctuation and spacing the same way")
            raise InvalidInputError(
                f"labels {first + 1} {one_line(repr(names[first]), 60)} and {index + 1} "
                f"{one_line(repr(names[index]), 60)} are the same tokens to the text encoder ({why}), so they "
                "would get identical embeddings; keep one of them or make them differ earlier")


def report_truncated(names: Sequence[str], templates: Sequence[str], cut: list[tuple[str, int]], *,
                     context_length: int) -> None:
    """One warning line per label whose prompts were cut to the text encoder's context (not one per prompt).

    Args:
        names: the labels.
        templates: the prompt templates.
        cut: ``(prompt, tokens)`` of every cut prompt (`talk2dino.models.text_encoder.collect_truncations`).
        context_length: the encoder's context, in tokens.
    """
    if not cut:
        return
    label_of = {t.format(name): (index, name) for index, name in enumerate(names, start=1) for t in templates}
    by_label: dict[tuple[int, str], list[int]] = {}
    for prompt, tokens in cut:
        by_label.setdefault(label_of.get(prompt, (0, prompt)), []).append(tokens)
    for (index, name), lengths in by_label.items():
        shown = one_line(repr(name), 60)
        what = f"label {index} {shown}" if index else f"prompt {shown}"
        logger.warning("%s is too long for the text encoder: %d of %d prompts have up to %d tokens and were "
                       "cut to %d (the end of the label is ignored)", what, len(lengths), len(templates),
                       max(lengths), context_length)
